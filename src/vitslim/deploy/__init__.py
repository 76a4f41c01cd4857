"""Deploy: the compressed model as a file that carries its own contract.

    from vitslim.deploy import apply, load_artifact, predict_folder
    artifact, fidelity = apply(model, "int8-tome", "images/", "model.onnx")   # = `vitslim apply`
    print(predict_folder("model.onnx", "images/").top_k[0])                    # = `vitslim predict`

``vitslim compress`` saves its chosen candidate through the same ``build_artifact``.
"""

from vitslim.artifact import Artifact, Contract, ModelSource, contract_for, read_contract, source_of, write_contract
from vitslim.artifact import load as load_artifact
from vitslim.deploy.artifact import build_artifact
from vitslim.deploy.predict import Predictions, predict_folder
from vitslim.deploy.snippet import usage_markdown
from vitslim.deploy.workflow import apply, split_images

__all__ = [
           "Artifact",
           "Contract",
           "ModelSource",
           "Predictions",
           "apply",
           "build_artifact",
           "contract_for",
           "load_artifact",
           "predict_folder",
           "read_contract",
           "source_of",
           "split_images",
           "usage_markdown",
           "write_contract",
]
