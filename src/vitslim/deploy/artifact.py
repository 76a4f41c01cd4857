"""Artifacts: a compressed model saved ready to deploy, with its contract inside.

* A recipe with an ``export`` step gives one ``.onnx`` file, its contract in ``metadata_props``:
  for ONNX Runtime (int8 kernels when quantized), or, when the export step names OpenVINO, the
  portable Q/DQ graph that OpenVINO runs at the precision hint the step records.
* Any other recipe gives a folder: ``model.safetensors`` (every tensor, as the compressed
  model holds it: bf16, reparameterized and quantizer state) and ``vitslim.json`` (the
  contract, plus the quantization config). It loads back by itself with ``load_artifact``:
  the architecture is rebuilt from the timm name, the recipe's token reduction / dtype /
  quantization steps are replayed (without calibration), and the saved tensors put in place.

Both are written atomically (a temporary file or folder, then a rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitslim import registry
from vitslim.bench import OnnxModel, dedupe_shared_tensors
from vitslim.compress.recipes import Recipe, recipe_from_dict
from vitslim.compress.steps import apply_recipe
from vitslim.datafile import check_mapping, read_data_file
from vitslim.deploy.contract import Contract, ModelSource, contract_for
from vitslim.errors import ConfigError, ModelLoadError
from vitslim.export import export_onnx
from vitslim.export.config import export_step
from vitslim.models import REFERENCE_NAME, load_model
from vitslim.models.loading import load_state_dict_strict
from vitslim.models.reference import load_reference_model
from vitslim.output import atomic_dir, publish, write_text_atomic
from vitslim.quant.config import QuantConfig
from vitslim.quant.io import restore_quantized
from vitslim.quant.ptq import CONFIG_ATTR

if TYPE_CHECKING:
    from vitslim.openvino_runtime import OpenVinoModel

WEIGHTS_FILE, META_FILE = "model.safetensors", "vitslim.json"
FOLDER_STEPS = ("tokens", "dtype", "quantize")  # recipe steps a saved folder knows how to replay


@dataclass
class Artifact:
    """A loaded artifact: the runnable model (PyTorch module or ONNX Runtime session) and
    its contract."""

    path: Path
    model: nn.Module | OnnxModel | OpenVinoModel
    contract: Contract

    @property
    def runtime(self) -> str:
        if isinstance(self.model, nn.Module):
            return "pytorch"
        return getattr(self.model, "runtime", "onnxruntime")

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The artifact's output (logits or features, see the contract) for a batch of
        preprocessed images, as float32."""
        if not isinstance(self.model, nn.Module):
            return self.model(images)
        dtype = next(self.model.parameters()).dtype
        return self.model(images.to(dtype)).float()


def artifact_name(recipe: Recipe, stem: str = "model") -> str:
    """``model.onnx`` for exported recipes, the folder ``model`` otherwise."""
    return f"{stem}.onnx" if recipe.exports else stem


def check_out_path(out: str | Path, recipe: Recipe) -> Path:
    """``out`` must say the format the recipe makes: NAME.onnx when it exports, a folder otherwise."""
    out = Path(out)
    if recipe.exports and out.suffix != ".onnx":
        raise ConfigError(f"recipe {recipe.name!r} exports to ONNX: give --out NAME.onnx (got {str(out)!r})")
    if not recipe.exports and out.suffix == ".onnx":
        raise ConfigError(f"recipe {recipe.name!r} has no export step, so it makes a PyTorch model saved as a "
                          f"folder: give --out DIR (got {str(out)!r}), or add `- export: {{format: onnx}}`")
    if out.is_dir() and not recipe.exports and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise ConfigError(f"--out {str(out)!r} is a folder that is not a vitslim artifact; choose a new path")
    return out


def build_artifact(model: nn.Module, recipe: Recipe, calib: torch.Tensor, out: str | Path,
                   source: ModelSource, calibration: dict | None = None, key: str = "",
                   applied: nn.Module | None = None) -> Path:
    """Apply ``recipe`` to a copy of ``model`` (calibrating on ``calib``) and save the result at
    ``out``: the one code path behind ``vitslim apply`` and every candidate of ``vitslim compress``.
    ``applied``: the recipe's steps already applied to ``model`` (one build saved for several
    runtimes)."""
    out = check_out_path(out, recipe)
    kinds = [registry.method_of(s).step for s in recipe.steps]
    unsupported = [k for k in kinds if k not in (*FOLDER_STEPS, "export")]
    if unsupported and not recipe.exports:
        raise ConfigError(f"recipe {recipe.name!r}: a model after a {unsupported[0]!r} step cannot be saved as a "
                          "folder yet; add an export step to get an ONNX file")
    compressed = applied if applied is not None else apply_recipe(model, recipe, calib)
    contract = contract_for(compressed, source, recipe.to_dict(), calibration, key)
    out.parent.mkdir(parents=True, exist_ok=True)
    if recipe.exports:
        _write_onnx(compressed, out, contract, ort_kernels=export_step(recipe.steps).runtime == "onnxruntime")
    else:
        _write_folder(compressed, out, contract)
    return out


def _write_onnx(model: nn.Module, out: Path, contract: Contract, ort_kernels: bool = True) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp.onnx")
    os.close(fd)
    try:
        export_onnx(model, tmp, ort_kernels=ort_kernels)
        _set_onnx_metadata(Path(tmp), contract)
        publish(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _set_onnx_metadata(path: Path, contract: Contract) -> None:
    graph = onnx.load(str(path))
    kept = [(p.key, p.value) for p in graph.metadata_props if not p.key.startswith("vitslim.")]
    del graph.metadata_props[:]
    onnx.helper.set_model_props(graph, dict(kept) | contract.to_metadata())
    onnx.save(graph, str(path))


def _write_folder(model: nn.Module, out: Path, contract: Contract) -> None:
    config = getattr(model, CONFIG_ATTR, None)
    with atomic_dir(out) as tmp:
        state = dedupe_shared_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()})
        save_file(state, str(tmp / WEIGHTS_FILE))
        meta = {"contract": contract.to_dict(), "quant_config": config.to_dict() if config else None}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def is_artifact(path: str | Path) -> bool:
    path = Path(path)
    return (path.suffix == ".onnx" and path.is_file()) or (path / META_FILE).is_file()


def read_contract(path: str | Path) -> Contract:
    """The contract stored in an artifact (``.onnx`` file or saved folder), checked: a
    malformed one is a ``ModelLoadError`` naming the file."""
    path = Path(path)
    if path.suffix == ".onnx" and path.is_file():
        try:
            metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as err:  # protobuf reports damaged files as several exception types
            raise ModelLoadError(f"{str(path)!r} is not a readable ONNX file ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:200]})") from None
        if "vitslim.preprocessing" not in metadata:
            raise ModelLoadError(f"{str(path)!r} carries no vitslim contract (preprocessing, output meaning); "
                                 "make it with `vitslim apply`, `vitslim compress` or `vitslim export`")
        return _checked(lambda: Contract.from_metadata(metadata, "contract"), path)
    if (path / META_FILE).is_file():
        return _checked(lambda: Contract.from_dict(read_folder_meta(path)["contract"], "contract"), path)
    raise ModelLoadError(f"{str(path)!r} is not a vitslim artifact: expected an .onnx file or a folder "
                         f"with {META_FILE} (made by `vitslim apply` or `vitslim compress`)")


def read_folder_meta(path: Path) -> dict:
    """``vitslim.json`` of a saved folder: a mapping with ``contract`` and ``quant_config``."""
    meta = check_mapping(read_data_file(path / META_FILE, META_FILE), META_FILE)
    if not isinstance(meta.get("contract"), dict) or not isinstance(meta.get("quant_config"), (dict, type(None))):
        raise ConfigError(f"{META_FILE}: expected the fields 'contract' (a mapping) and 'quant_config'")
    return meta


def _checked(read, path: Path) -> Contract:
    try:
        return read()
    except ConfigError as err:
        raise ModelLoadError(f"{str(path)!r}: unusable vitslim contract: {err}; re-create the artifact "
                             "with `vitslim apply` or `vitslim compress`") from None


def write_contract(path: str | Path, contract: Contract) -> None:
    """Replace the contract stored in an artifact, atomically."""
    path = Path(path)
    if path.suffix == ".onnx":
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.onnx")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            _set_onnx_metadata(Path(tmp), contract)
            publish(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    meta = read_folder_meta(path)
    write_text_atomic(path / META_FILE, json.dumps(meta | {"contract": contract.to_dict()}, indent=2) + "\n")


def load_artifact(path: str | Path, threads: int | None = None) -> Artifact:
    """Load what ``build_artifact`` saved: an ONNX Runtime session, the graph compiled by
    OpenVINO (when its recipe's export step names it), or the rebuilt PyTorch model."""
    path = Path(path)
    contract = read_contract(path)
    if path.suffix == ".onnx":
        step = export_step(recipe_from_dict(contract.recipe).steps)
        if step.runtime == "openvino":
            from vitslim.openvino_runtime import OpenVinoModel  # the optional extra, only when asked for

            model = OpenVinoModel(path, step.precision, threads, contract.num_classes)
            model.contract = contract
            return Artifact(path, model, contract)
        return Artifact(path, OnnxModel(path, threads), contract)
    return Artifact(path, _load_folder(path, contract), contract)


def _load_folder(path: Path, contract: Contract) -> nn.Module:
    meta = read_folder_meta(path)
    recipe = recipe_from_dict(contract.recipe)
    model = _architecture(ModelSource(contract.source["name"], contract.source.get("checkpoint"),
                                      contract.source.get("timm_kwargs") or {}))
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{str(path / WEIGHTS_FILE)!r} is not a readable safetensors file ({err}); "
                             "re-create the artifact with `vitslim apply`") from None
    loaded = False
    for step in recipe.steps:  # replayed in the recipe's order, as they were applied
        if not isinstance(step, QuantConfig):  # token reduction, dtype: no calibration, no weights
            registry.apply_(model, step)
        else:  # quantization: its calibrated state is in the saved weights
            if meta["quant_config"] is None:
                raise ModelLoadError(f"{str(path / META_FILE)!r}: a quantize step but no quant_config; "
                                     "re-create the artifact with `vitslim apply`")
            restore_quantized(model, QuantConfig.from_dict(meta["quant_config"]), state, str(path / WEIGHTS_FILE))
            loaded = True
    if not loaded:
        load_state_dict_strict(model, state, source=str(path / WEIGHTS_FILE))
    return model.eval()


def _architecture(source: ModelSource) -> nn.Module:
    if source.name == REFERENCE_NAME:
        return load_reference_model()
    return load_model(source.name, pretrained=False, **source.timm_kwargs)
