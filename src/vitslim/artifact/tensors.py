"""Tensors on disk: safetensors files written and read without pickle, and their fingerprints.

Writes go through ``vitslim.output.atomic_path`` and turn the file system's faults (disk full,
file too large, no permission, I/O error) into an ``OutputPathError`` naming the file:
safetensors reports them as its own error type, with the OS error number in the text.
"""

from __future__ import annotations

import errno
import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vitslim.errors import ModelLoadError
from vitslim.output import atomic_path, os_error

MAX_HEADER_TENSORS = 1_000_000  # far beyond any ViT (DINOv2-g has about 600 tensors)


def dedupe_shared_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): keep one copy of each."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else (k,)
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model``'s state dict, detached, contiguous, shared ones once."""
    return dedupe_shared_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()})


def saved_size_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a saved artifact holds for ``model`` (its weights file, less the header)."""
    return sum(t.numel() * t.element_size() for t in state_to_save(model).values())


def write_tensors(state: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``state`` to ``path`` atomically; returns the file's SHA-256."""
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp))
        except SafetensorError as err:
            number = re.search(r"os error (\d+)", str(err))
            raise os_error(int(number.group(1)) if number else errno.EIO, path) from None
        return file_sha256(tmp)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_shapes(path: Path, redo: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header (no tensor data is read)."""
    try:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            if len(names) > MAX_HEADER_TENSORS:
                raise ModelLoadError(f"{str(path)!r} lists {len(names)} tensors; {redo}")
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{str(path)!r} is not a readable safetensors file ({_first_line(err)}); {redo}") from None


def read_tensors(path: Path, redo: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{str(path)!r} is not a readable safetensors file ({_first_line(err)}); {redo}") from None


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]
