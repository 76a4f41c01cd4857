"""What the benchmark scripts share: where their images come from by default."""

from pathlib import Path

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
BUNDLED_IMAGES = Path(__file__).resolve().parents[1] / "src" / "vitslim" / "assets" / "example_images"
# The 500 shared ImageNet photos beside the project when present, else the 16 bundled ones.
DEFAULT_IMAGES = SHARED_IMAGES if SHARED_IMAGES.is_dir() else BUNDLED_IMAGES
