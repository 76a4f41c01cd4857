"""Images in, tensors out: folder layouts, the model's own transforms, calibration splits.

Two layouts are understood:

* class sub-folders (``root/<class>/<image>``, the ImageNet/torchvision layout); a sub-folder
  named by an ImageNet wnid (``n01440764``) takes that class's ImageNet index, others are
  numbered in sorted order;
* a flat folder of images; files named ``<wnid>_<name>.JPEG`` are labelled with the wnid's
  ImageNet index, other files are unlabelled (label -1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vitslim.errors import BadImageError, DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
UNLABELLED = -1


@cache
def imagenet_wnids() -> dict[str, int]:
    """wnid -> ImageNet-1k class index, in the standard (sorted wnid) order."""
    table = files("vitslim.assets").joinpath("imagenet_classes.tsv").read_text()
    rows = (line.split("\t") for line in table.splitlines() if line.strip())
    return {wnid: int(idx) for idx, wnid, *_ in rows}


@dataclass
class ImageFolder(Dataset):
    """A list of (image path, label) with a transform; counts images it had to skip."""

    samples: list[tuple[Path, int]]
    transform: Callable[[Image.Image], torch.Tensor]
    skip_bad: bool = False
    skipped: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            if not self.skip_bad:
                raise BadImageError(
                    f"cannot read image {str(path)!r} ({type(err).__name__}: {err}); remove or "
                    "fix it, or pass --skip-bad to skip unreadable images and count them."
                ) from err
            self.skipped.append(path)
            return None
        return self.transform(image), label


def list_images(root: str | Path) -> list[tuple[Path, int]]:
    """Find the images under ``root`` with their labels (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    wnids = imagenet_wnids()
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        all_wnids = all(d.name in wnids for d in subdirs)
        samples = [
            (p, wnids[d.name] if all_wnids else k)
            for k, d in enumerate(subdirs)
            for p in sorted(d.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        samples = [
            (p, wnids.get(p.name.split("_")[0], UNLABELLED))
            for p in sorted(root.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not samples:
        raise DataError(
            f"no images in {str(root)!r} (looked for {sorted(IMAGE_SUFFIXES)} files, flat or "
            "one sub-folder per class); point --data at a folder of images."
        )
    return samples


def model_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform from the model's own pretrained config (timm), at the input
    size the model was actually built for (``img_size=`` may differ from the config's)."""
    from timm.data import create_transform, resolve_data_config

    from vitslim.models.loading import input_size

    config = resolve_data_config({}, model=model)
    config["input_size"] = input_size(model)
    return create_transform(**config)


def load_image_folder(
    root: str | Path,
    model: nn.Module | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
) -> ImageFolder:
    """A dataset of the images under ``root``, transformed as ``model`` expects.

    ``limit`` keeps the first N images in sorted order (deterministic). ``skip_bad`` skips
    unreadable images instead of failing; ``dataset.skipped`` lists them after a pass.
    """
    if transform is None:
        if model is None:
            raise ValueError("give the model (for its preprocessing) or an explicit transform")
        transform = model_transform(model)
    samples = list_images(root)
    if limit is not None:
        samples = samples[:limit]
    return ImageFolder(samples, transform, skip_bad=skip_bad)


def calibration_split(dataset: Dataset, n_calib: int, seed: int = 0) -> tuple[Subset, Subset]:
    """Split into a seeded random calibration subset and the disjoint rest for evaluation.

    Warns (with the count) when the folder holds fewer than ``n_calib`` images; then every
    image calibrates and the evaluation subset is empty.
    """
    n = len(dataset)
    if n_calib < 0:
        raise ValueError(f"n_calib must be >= 0, got {n_calib}")
    if n_calib > n:
        warnings.warn(f"asked for {n_calib} calibration images but only {n} are available; using {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    calib, rest = sorted(order[:n_calib]), sorted(order[n_calib:])
    return Subset(dataset, calib), Subset(dataset, rest)


def _collate_readable(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels)


def make_loader(dataset: Dataset, batch_size: int = 32, num_workers: int = 0) -> DataLoader:
    """A deterministic (unshuffled) loader; batches drop images skipped as unreadable."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=_collate_readable)


def calibration_images(dataset: Dataset, batch_size: int = 32) -> torch.Tensor:
    """All images of a (calibration) dataset stacked into one tensor."""
    batches = [b[0] for b in make_loader(dataset, batch_size) if b is not None]
    if not batches:
        raise DataError("no readable calibration images")
    return torch.cat(batches)


def skipped_files(dataset: Dataset) -> list[Path]:
    """Images skipped as unreadable so far (also through a ``Subset``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return list(getattr(dataset, "skipped", []))
