"""Images in, tensors out: folder layouts, the model's own transforms, calibration splits.

An image is a file with an image suffix (``IMAGE_SUFFIXES``, any case) whose name does not
start with ``.``; hidden files and folders are ignored everywhere. Two layouts are understood:

* class sub-folders (``root/<class>/<image>``, the ImageNet/torchvision layout): if every
  sub-folder holding images is named by an ImageNet wnid (``n01440764``), each takes that
  class's ImageNet index; if none is, they are numbered in sorted order; a mix is an error
  (labels would silently shift);
* a flat folder of images; files named ``<wnid>_<name>.JPEG`` are labelled with the wnid's
  ImageNet index, other files are unlabelled (label -1).

Sub-folders without images are ignored. Images both at the top level and in sub-folders, or
images nested deeper than ``root/<class>/``, are an error naming one of each: no image is
silently left out.

Reading an image: it must be a regular file (a FIFO or device named ``x.jpg`` is refused
without opening it, so nothing blocks) of at most ``MAX_IMAGE_BYTES``, and at most
``MAX_IMAGE_PIXELS`` pixels (checked from the header, before decoding). 16-bit and 32-bit
integer grayscale (PIL modes ``I;16*`` and ``I``: values 0–65535) and float (``F``: values
0–1) images are scaled to 8 bits, not clipped; values outside those ranges are an error.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vitslim.errors import BadImageError, ConfigError, DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
UNLABELLED = -1
MAX_IMAGE_BYTES = 256 << 20
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default decompression-bomb threshold (~ 9459 x 9459)


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
    label_note: str | None = None  # why the labels were dropped (see align_labels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[i]
        try:
            image = read_image(path)
        except BadImageError:
            if not self.skip_bad:
                raise
            self.skipped.append(path)
            return None
        return self.transform(image), label


def read_image(path: str | Path) -> Image.Image:
    """One image file as 8-bit RGB (see the module docstring for what is accepted);
    a ``BadImageError`` naming the file otherwise."""
    path = Path(path)
    fix = "remove or fix it, or pass --skip-bad to skip unreadable images and count them"
    try:  # non-blocking: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise BadImageError(f"cannot open image {str(path)!r} ({err.strerror}); {fix}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadImageError(f"{str(path)!r} is not a regular file (a {_file_kind(st.st_mode)}); {fix}")
        if st.st_size > MAX_IMAGE_BYTES:
            raise BadImageError(f"image {str(path)!r} is {st.st_size} bytes, over the {MAX_IMAGE_BYTES} limit; {fix}")
        too_big = f"over the {MAX_IMAGE_PIXELS} limit (a decompression bomb?); {fix}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
                with Image.open(f) as img:
                    width, height = img.size
                    if width * height > MAX_IMAGE_PIXELS:
                        raise BadImageError(f"image {str(path)!r} is {width}x{height} pixels, {too_big}")
                    return to_rgb8(img)
        except BadImageError:
            raise
        except Image.DecompressionBombError:
            raise BadImageError(f"image {str(path)!r} has too many pixels, {too_big}") from None
        except Exception as err:  # PIL's decoders fail on damaged files with many exception types
            raise BadImageError(f"cannot read image {str(path)!r} ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:200]}); {fix}") from None


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISSOCK: "socket", stat.S_ISDIR: "folder"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


# PIL mode -> the value range that maps to 0..255 (PIL's own convert() clips these instead).
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB: wide grayscale modes scaled by their full range (16-bit 65535 -> 255),
    everything else through PIL's ``convert``."""
    if img.mode not in WIDE_MODES:
        return img.convert("RGB")
    top = WIDE_MODES[img.mode]
    values = np.asarray(img, dtype=np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= top):
        raise ValueError(f"{img.mode} image with values in [{values.min()}, {values.max()}]; vitslim reads "
                         f"this mode as 0..{top}: convert it to 8-bit")
    gray = np.rint(values * (255 / top)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _is_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir()


def _visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise DataError(f"cannot list folder {str(folder)!r} ({err.strerror})") from None


def _nested_image(folder: Path) -> Path | None:
    """An image anywhere below ``folder``'s sub-folders (hidden ones aside), or None."""
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if Path(top) != folder:
            found = next((Path(top) / n for n in sorted(names) if _is_image(Path(top) / n)), None)
            if found:
                return found
    return None


def list_images(root: str | Path) -> list[tuple[Path, int]]:
    """Find the images under ``root`` with their labels (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    entries = _visible(root)
    top_images = [p for p in entries if _is_image(p)]
    subdirs = [d for d in entries if d.is_dir()]
    for d in subdirs:
        deep = _nested_image(d)
        if deep:
            raise DataError(f"image {str(deep)!r} is nested more than one folder below {str(root)!r}; vitslim "
                            "reads a flat folder or one sub-folder per class: move it up, or point --data lower")
    classes = [(d, images) for d in subdirs if (images := [p for p in _visible(d) if _is_image(p)])]
    if top_images and classes:
        raise DataError(f"{str(root)!r} has images both at its top level (e.g. {top_images[0].name!r}) and in "
                        f"sub-folders (e.g. {classes[0][0].name!r}/); use one layout: move the top-level images "
                        "into a class sub-folder, or the sub-folders elsewhere")
    if classes:
        samples = [(p, label) for (d, images), label in zip(classes, _class_labels([d for d, _ in classes]))
                   for p in images]
    else:
        wnids = imagenet_wnids()
        samples = [(p, wnids.get(p.name.split("_")[0], UNLABELLED)) for p in top_images]
    if not samples:
        raise DataError(
            f"no images in {str(root)!r} (looked for {sorted(IMAGE_SUFFIXES)} files, flat or "
            "one sub-folder per class); point --data at a folder of images."
        )
    return samples


def _class_labels(folders: list[Path]) -> list[int]:
    """ImageNet indices when every class folder is a wnid, 0..n-1 in sorted order when none is."""
    wnids = imagenet_wnids()
    named = [d.name for d in folders if d.name in wnids]
    if not named:
        return list(range(len(folders)))
    other = [d.name for d in folders if d.name not in wnids]
    if other:
        raise DataError(f"class sub-folders mix ImageNet wnids (e.g. {named[0]!r}) with other names (e.g. "
                        f"{other[0]!r}); labels would be ambiguous: rename or move the other folders")
    return [wnids[d.name] for d in folders]


# How an image is resized: "pil" is timm's evaluation transform (PIL filters, centre-crop offset
# rounded); "tensor" is transformers' image processors (torchvision on uint8 tensors, offset floored).
RESAMPLERS = ("pil", "tensor")
RESCALE = 1 / 255


@dataclass(frozen=True)
class TensorImageTransform:
    """The preprocessing of ``transformers``' image processors with their default (torchvision)
    backend, step for step: the 8-bit RGB image as a uint8 tensor; resized by torchvision with
    antialiasing, the shorter side to ``resize[0]`` (``crop_mode="center"``, square input) or
    both sides to ``resize`` (``"squash"``); centre-cropped to ``input_size`` with the offset
    rounded down; then rescaled and normalized in one float32 step, ``(x - mean/r) / (std/r)``
    with ``r = 1/255``."""

    input_size: tuple[int, int, int]
    resize: tuple[int, int]
    crop_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        x = tvF.resize(x, list(self._resized(*x.shape[-2:])), interpolation=InterpolationMode(self.interpolation),
                       antialias=True)
        (height, width), (crop_h, crop_w) = x.shape[-2:], self.input_size[1:]
        top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
        x = x[:, top:top + crop_h, left:left + crop_w]
        mean, std = torch.tensor(self.mean) * (1.0 / RESCALE), torch.tensor(self.std) * (1.0 / RESCALE)
        return tvF.normalize(x.to(torch.float32), mean.tolist(), std.tolist())

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if self.crop_mode == "squash" or self.resize[0] != self.resize[1]:
            return self.resize
        short, long = sorted((height, width))
        new_long = int(self.resize[0] * long / short)
        return (new_long, self.resize[0]) if width <= height else (self.resize[0], new_long)


def preprocessing_transform(p: dict) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image in, normalized (C, H, W) tensor out, from a preprocessing description
    (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std`` and
    optionally ``resampler``, one of ``RESAMPLERS``; ``pil`` when absent)."""
    resampler = p.get("resampler", "pil")
    if resampler not in RESAMPLERS:
        raise ConfigError(f"resampler {resampler!r} is not one of {RESAMPLERS}")
    size = tuple(p["input_size"])
    if resampler == "pil":
        return create_transform(input_size=size, interpolation=p["interpolation"], mean=tuple(p["mean"]),
                                std=tuple(p["std"]), crop_pct=p["crop_pct"], crop_mode=p["crop_mode"])
    if p["crop_mode"] not in ("center", "squash"):
        raise ConfigError(f"crop_mode {p['crop_mode']!r} is not one transformers' image processors use")
    resize = tuple(math.floor(side / p["crop_pct"]) for side in size[1:])
    return TensorImageTransform(size, resize, p["crop_mode"], p["interpolation"], tuple(p["mean"]), tuple(p["std"]))


def model_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform from the model's own pretrained config (timm, or a Hugging Face
    image processor's), at the input size the model was actually built for (``img_size=`` may
    differ from the config's)."""
    from vitslim.models.loading import input_size

    config = resolve_data_config({}, model=model)
    config["input_size"] = input_size(model)
    config["resampler"] = (getattr(model, "pretrained_cfg", None) or {}).get("resampler", "pil")
    return preprocessing_transform(config)


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
    note = None
    if model is not None:
        samples, note = align_labels(samples, int(getattr(model, "num_classes", 0) or 0),
                                     getattr(model, "class_names", None))
    return ImageFolder(samples, transform, skip_bad=skip_bad, label_note=note)


@cache
def imagenet_names() -> tuple[str, ...]:
    """The ImageNet-1k class names in class-index order (vitslim's table)."""
    table = files("vitslim.assets").joinpath("imagenet_classes.tsv").read_text()
    return tuple(line.split("\t")[2] for line in table.splitlines() if line.strip())


def _name_key(name: str) -> str:
    return name.split(",")[0].strip().lower().replace("_", " ").replace("-", " ")


def is_imagenet_head(class_names: list[str]) -> bool:
    """Whether a head's class names are ImageNet-1k's, in its order (at least 90 % of the 1000
    names agree; checkpoints spell a few differently, e.g. "tench, Tinca tinca" for "tench")."""
    if len(class_names) != 1000:
        return False
    return sum(_name_key(a) == _name_key(b) for a, b in zip(class_names, imagenet_names())) >= 900


def align_labels(samples: list[tuple[Path, int]], classes: int,
                 class_names: list[str] | None) -> tuple[list[tuple[Path, int]], str | None]:
    """The labels in the classifier's own class order, or all dropped (-1) with the reason when
    the data's labels and the head do not share a vocabulary, so accuracy is never scored
    against unrelated classes. ImageNet-labelled images (wnids) need an ImageNet-1k head (1000
    classes; named ones must be ImageNet's). Other class folders are matched by name when the
    head names its classes, else taken in sorted order (the folder layout's convention)."""
    labelled = [(path, label) for path, label in samples if label >= 0]
    if not labelled or classes <= 0:
        return samples, None
    unlabelled = [(path, UNLABELLED) for path, _ in samples]
    head = f"the model's {classes}-class head" + (f" ({', '.join(class_names[:3])}, ...)" if class_names else "")
    wnids = imagenet_wnids()
    if all(label in (wnids.get(path.parent.name), wnids.get(path.name.split("_")[0])) for path, label in labelled):
        if classes == 1000 and (class_names is None or is_imagenet_head(class_names)):
            return samples, None
        return unlabelled, f"the images are labelled with ImageNet-1k classes but {head} is not ImageNet-1k"
    if class_names is None:
        return samples, None
    index = {_name_key(name): i for i, name in enumerate(class_names)}
    missing = sorted({path.parent.name for path, _ in labelled if _name_key(path.parent.name) not in index})
    if missing:
        return unlabelled, f"class folder {missing[0]!r} is not one of the class names of {head}"
    return [(path, index[_name_key(path.parent.name)] if label >= 0 else label) for path, label in samples], None


def calibration_split(dataset: Dataset, n_calib: int, seed: int = 0) -> tuple[Subset, Subset]:
    """Split into a seeded random calibration subset and the disjoint rest for evaluation.

    Warns (with the count) when the folder holds fewer than ``n_calib`` images; then every
    image calibrates and the evaluation subset is empty.
    """
    n = len(dataset)
    if n_calib < 0:
        raise ConfigError(f"n_calib must be >= 0, got {n_calib}")
    if n_calib > n:
        warnings.warn(f"asked for {n_calib} calibration images but only {n} are available; using {n}", stacklevel=2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    calib, rest = sorted(order[:n_calib]), sorted(order[n_calib:])
    return Subset(dataset, calib), Subset(dataset, rest)


def cross_validation_folds(dataset: Dataset, n_calib: int, n_eval: int | None = None,
                           seed: int = 0) -> list[tuple[Subset, Subset]]:
    """Two folds over disjoint halves of ``dataset``: calibrate on a seeded draw of
    ``n_calib`` images from one half, evaluate on (the first ``n_eval`` of) the other half,
    then swap. Settings chosen on the mean and worst fold hold on images never seen."""
    n = len(dataset)
    if n < 2 * (n_calib + 1):
        raise DataError(f"cross-validation needs at least {2 * (n_calib + 1)} images ({n_calib} to calibrate and "
                        f"one to evaluate in each half); the folder has {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    halves = order[: n // 2], order[n // 2:]
    return [(Subset(dataset, sorted(a[:n_calib])), Subset(dataset, sorted(b[:n_eval])))
            for a, b in (halves, halves[::-1])]


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
