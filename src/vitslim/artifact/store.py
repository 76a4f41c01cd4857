"""The saved-model format: ``save`` writes any vitslim model, ``load`` is the one reader.

An artifact is one of two things, each carrying its contract (``vitslim.artifact.contract``):

* an ``.onnx`` file: the graph ONNX Runtime runs, the contract in ``metadata_props``
  (``vitslim.<field>``, JSON values) with ``vitslim.checksum`` over them;
* a folder: ``model.safetensors`` (every tensor as the model holds it: pruned shapes, bf16,
  quantizer state) and ``vitslim.json`` ``{"format", "contract", "state", "weights_sha256",
  "checksum"}``, where ``state`` records what rebuilds the module structure (the pruned shapes,
  the quantization config) and ``checksum`` covers the whole file, which names the weights by
  their SHA-256: nothing that changes what the model computes can be edited unnoticed.

Loading a folder checks before it builds: the JSON's types and ranges, the checksums, the
architecture's arguments (bounded sizes, no paths, no downloads), then the architecture is
built on the ``meta`` device (no memory) and held against the weights file's header and the
contract's output; only then is the model built and filled. Every failure is one
``ModelLoadError`` naming the file and what to do. JSON is strict (no NaN or Infinity tokens:
an infinite SQNR is written ``"inf"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from vitslim import registry
from vitslim.artifact.contract import Contract, ModelSource, contract_for, output_of, source_of
from vitslim.artifact.tensors import file_sha256, read_tensors, state_to_save, tensor_shapes, write_tensors
from vitslim.datafile import MAX_STR, brief, check_mapping, check_type, read_data_file
from vitslim.dtype import DtypeConfig
from vitslim.errors import ConfigError, ModelLoadError, OutputPathError
from vitslim.export import export_onnx
from vitslim.export.config import ExportConfig, export_step
from vitslim.models.adapter import vit_parts
from vitslim.models.checkpoint import load_state_dict_strict
from vitslim.models.hf import HF_PREFIX, hf_architecture
from vitslim.models.loading import REFERENCE_NAME, load_model
from vitslim.models.reference import create_reference_architecture
from vitslim.output import (
    atomic_dir,
    check_output_dir,
    check_output_file,
    is_user_fault,
    json_text,
    os_error,
    publish,
    write_text_atomic,
)
from vitslim.prune import PruneConfig
from vitslim.prune.allocate import Plan
from vitslim.prune.surgery import INDEX_KEYS, SHAPES_ATTR, apply_plan
from vitslim.quant import QuantConfig
from vitslim.quant.hybrid import CONFIG_ATTR as HYBRID_ATTR
from vitslim.quant.ptq import CONFIG_ATTR, install
from vitslim.quant.restore import is_empty_buffer, restore_quantized, with_rotation
from vitslim.recipes import Recipe, recipe_from_dict
from vitslim.runtime import OnnxModel
from vitslim.tokens import token_state

FORMAT = 2
WEIGHTS_FILE, META_FILE = "model.safetensors", "vitslim.json"
META_FIELDS = {"format": int, "contract": dict[str, Any], "state": dict[str, Any], "weights_sha256": str,
               "checksum": str}
# What earlier versions wrote in a model folder, and the command that wrote it.
LEGACY_FILES = {"quant.json": "vitslim quantize", "prune.json": "vitslim prune"}
FOLDER_STEPS = ("prune", "tokens", "dtype", "quantize")  # recipe steps a saved folder rebuilds
CHECKSUM_KEY = "vitslim.checksum"
MARKER = ".vitslim-output"  # in a folder of results vitslim made (see vitslim.artifact.outputs)
FORCE_HINT = "choose another path, or pass --force to replace it"
# Constructor keywords an artifact may pass to timm, each with its largest sensible value
# (far beyond any released ViT); anything else could load files, download weights or build
# a model larger than the machine.
TIMM_KWARGS = {"img_size": 4096, "patch_size": 512, "in_chans": 3, "num_classes": 100_000, "global_pool": None,
               "embed_dim": 16_384, "depth": 256, "num_heads": 256, "mlp_ratio": 64, "qkv_bias": None,
               "qk_norm": None, "init_values": None, "class_token": None, "no_embed_class": None,
               "reg_tokens": 256, "pre_norm": None, "fc_norm": None, "dynamic_img_size": None,
               "dynamic_img_pad": None, "drop_rate": None, "pos_drop_rate": None, "proj_drop_rate": None,
               "attn_drop_rate": None, "drop_path_rate": None, "use_abs_pos_emb": None, "use_rel_pos_bias": None,
               "use_shared_rel_pos_bias": None, "use_mean_pooling": None, "head_init_scale": None,
               "pos_embed": None, "embed_layer": None, "weight_init": None, "act_layer": None,
               "use_fc_norm": None, "num_prefix_tokens": 16, "pretrained_cfg_overlay": None}
# What ``pretrained_cfg_overlay`` may change: the data config (never a file, URL or hub id).
CFG_OVERLAY_KEYS = {"input_size": 4096, "test_input_size": 4096, "mean": 1e6, "std": 1e6, "crop_pct": 10,
                    "test_crop_pct": 10, "crop_mode": None, "interpolation": None, "num_classes": 100_000}
HF_CONFIG_LIMITS = {"num_hidden_layers": 256, "hidden_size": 16_384, "intermediate_size": 65_536,
                    "num_attention_heads": 256, "image_size": 4096, "patch_size": 512, "num_channels": 3,
                    "num_labels": 100_000}


@dataclass
class Artifact:
    """A loaded artifact: the runnable model (PyTorch module or ONNX Runtime session) and its contract."""

    path: Path
    model: nn.Module | OnnxModel | Any  # Any: vitslim.openvino_runtime.OpenVinoModel (optional extra)
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
        if not isinstance(self.model, nn.Module):  # ONNX Runtime or OpenVINO
            return self.model(images)
        dtype = next(self.model.parameters()).dtype
        return self.model(images.to(dtype)).float()


# ---------------------------------------------------------------- saving


def save(model: nn.Module, path: str | Path, source: ModelSource | str | None = None, recipe: Recipe | None = None,
         calibration: dict | None = None, key: str = "", ort_kernels: bool = True, force: bool = False) -> Path:
    """Save ``model`` at ``path``: an ONNX file when ``path`` ends in ``.onnx``, else a folder
    that ``load`` rebuilds. ``source`` (a ``ModelSource`` or a model name) says which
    architecture it was made from; ``recipe`` what was applied to it (default: read from the
    model: its pruning, dtype and quantization). Written atomically; returns ``path``. What is
    at ``path`` is replaced only when vitslim wrote it (``claim_artifact_path``), or ``force``."""
    path = claim_artifact_path(path, force)
    source = ModelSource(source) if isinstance(source, str) else source or source_of(model)
    recipe = recipe or recipe_of(model, exports=path.suffix == ".onnx")
    if recipe.exports != (path.suffix == ".onnx"):
        raise ConfigError(f"recipe {recipe.name!r} {'exports' if recipe.exports else 'does not export'} to ONNX, "
                          f"so its artifact is {'NAME.onnx' if recipe.exports else 'a folder'} (got {str(path)!r})")
    contract = contract_for(model, source, recipe.to_dict(), calibration, key)
    if recipe.exports:
        _save_onnx(model, path, contract, ort_kernels)
    else:
        _save_folder(model, path, contract, recipe)
    return path


def written_by_vitslim(path: Path) -> bool:
    """Whether ``path`` holds something vitslim wrote (and may replace)."""
    if path.is_dir():
        return any((path / name).exists() for name in (MARKER, META_FILE, *LEGACY_FILES))
    if path.suffix == ".onnx" and path.is_file():
        try:
            return bool(onnx_metadata(path).keys() & {CHECKSUM_KEY, "vitslim.preprocessing"})
        except ModelLoadError:  # not a readable ONNX file: not ours
            return False
    return False


def claim_artifact_path(path: str | Path, force: bool = False, what: str = "output") -> Path:
    """Fail now, before long work, unless an artifact (``.onnx`` file or folder) may be written
    at ``path``: writable, and absent, empty or written by vitslim (or ``force``)."""
    path = Path(path)
    if path.suffix == ".onnx":
        check_output_file(path, what)
        foreign = path.exists() and not written_by_vitslim(path)
    else:
        check_output_dir(path, what)
        foreign = path.is_dir() and any(path.iterdir()) and not written_by_vitslim(path)
    if foreign and not force:
        raise OutputPathError(f"{what} {str(path)!r} exists and was not written by vitslim (no vitslim contract or "
                              f"{META_FILE}); {FORCE_HINT}")
    return path


def recipe_of(model: nn.Module, exports: bool = False) -> Recipe:
    """The steps a model records having been through: pruning (``prune_``), bfloat16, and
    quantization (``quantize_``). Token reduction leaves no config on the model: pass the recipe."""
    steps: list[Any] = []
    pruned = getattr(model, SHAPES_ATTR, None)
    if pruned is not None:
        if "config" not in pruned:
            raise ConfigError("this pruned model records no PruneConfig (not pruned by prune_); pass recipe=")
        steps.append(PruneConfig.from_dict(pruned["config"]))
    if token_state(model) is not None:
        raise ConfigError("a token-reduced model does not record its config: pass recipe=Recipe(name, (config, ...))")
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        steps.append(DtypeConfig("bfloat16"))
    quantized = getattr(model, CONFIG_ATTR, None) or getattr(model, HYBRID_ATTR, None)
    if quantized is not None:
        steps.append(quantized)
    return Recipe("saved", (*steps, *([ExportConfig()] if exports else ())))


def _save_onnx(model: nn.Module, path: Path, contract: Contract, ort_kernels: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.onnx")
    os.close(fd)
    try:
        export_onnx(model, tmp, ort_kernels=ort_kernels)
        _setonnx_metadata(Path(tmp), contract)
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _setonnx_metadata(path: Path, contract: Contract) -> None:
    graph = onnx.load(str(path))
    kept = [(p.key, p.value) for p in graph.metadata_props if not p.key.startswith("vitslim.")]
    del graph.metadata_props[:]
    metadata = contract.to_metadata()
    onnx.helper.set_model_props(graph, dict(kept) | metadata | {CHECKSUM_KEY: json.dumps(_contract_checksum(metadata))})
    try:
        onnx.save(graph, str(path))
    except OSError as err:
        raise _fault(err, path) from None


def _save_folder(model: nn.Module, path: Path, contract: Contract, recipe: Recipe) -> None:
    unsupported = [registry.method_of(s).step for s in recipe.steps
                   if registry.method_of(s).step not in FOLDER_STEPS or type(s).__name__ == "HybridQuantConfig"]
    if unsupported:
        raise ConfigError(f"recipe {recipe.name!r}: a model after a {unsupported[0]!r} step of this kind cannot be "
                          "saved as a folder yet; add an export step to get an ONNX file")
    quantized = getattr(model, CONFIG_ATTR, None)
    pruned = getattr(model, SHAPES_ATTR, None)
    state = {"prune": {k: v for k, v in pruned.items() if k != "config"} if pruned else None,
             "quantize": quantized.to_dict() if quantized else None}
    with atomic_dir(path) as tmp:
        sha = write_tensors(state_to_save(model), tmp / WEIGHTS_FILE)
        _write_meta(tmp, {"format": FORMAT, "contract": contract.to_dict(), "state": state, "weights_sha256": sha})


def _write_meta(folder: Path, meta: dict) -> None:
    body = json.loads(json_text({k: v for k, v in meta.items() if k != "checksum"}))  # as a reader will see it
    write_text_atomic(folder / META_FILE, json_text({**body, "checksum": _checksum(body)}))


def _checksum(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _contract_checksum(metadata: dict[str, str]) -> str:
    return _checksum({k: v for k, v in metadata.items() if k.startswith("vitslim.") and k != CHECKSUM_KEY})


def _fault(err: OSError, path: Path) -> Exception:
    return os_error(err.errno, path) if is_user_fault(err) and err.errno else err


def write_contract(path: str | Path, contract: Contract) -> None:
    """Replace the contract stored in an artifact (e.g. with measured fidelity), atomically."""
    path = Path(path)
    if path.suffix == ".onnx":
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.onnx")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            _setonnx_metadata(Path(tmp), contract)
            publish(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    meta = _read_meta(path)
    _write_meta(path, meta | {"contract": contract.to_dict()})


# ---------------------------------------------------------------- reading


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` looks like something ``save`` wrote (an ``.onnx`` file or a folder with
    ``vitslim.json``); ``load`` checks it."""
    path = Path(path)
    return (path.suffix == ".onnx" and path.is_file()) or (path / META_FILE).is_file()


def load(path: str | Path, threads: int | None = None) -> Artifact:
    """Load what ``save`` wrote: an ONNX Runtime session or the rebuilt PyTorch model, with its
    contract, everything checked first (see the module doc)."""
    path = Path(path)
    if path.suffix == ".onnx" and path.is_file():
        contract = read_contract(path)
        step = export_step(recipe_from_dict(contract.recipe).steps)
        if step.runtime == "openvino":
            from vitslim.openvino_runtime import OpenVinoModel  # the optional extra, only when asked for

            model = OpenVinoModel(path, step.precision, threads, contract.num_classes)
            model.contract = contract
            return Artifact(path, model, contract)
        return Artifact(path, load_onnx(path, threads), contract)
    meta = _read_meta(path)
    contract = _contract(meta, path)
    return Artifact(path, _rebuild(path, meta, contract), contract)


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxModel:
    """An ONNX file in ONNX Runtime, with its vitslim contract checked when it carries one (any
    exported vision model opens as it is)."""
    path = Path(path)
    if not onnx_metadata(path).keys() & {CHECKSUM_KEY, "vitslim.preprocessing", "vitslim.recipe"}:
        return OnnxModel(path, threads)
    contract = read_contract(path)
    model = OnnxModel(path, threads, contract)
    _check_onnx_output(model, contract, path)
    return model


def read_contract(path: str | Path) -> Contract:
    """The contract stored in an artifact, checked (types, checksum); ``ModelLoadError`` otherwise."""
    path = Path(path)
    if path.suffix == ".onnx" and path.is_file():
        metadata = onnx_metadata(path)
        if "vitslim.preprocessing" not in metadata:
            raise ModelLoadError(f"{str(path)!r} carries no vitslim contract (preprocessing, output meaning); "
                                 "make it with `vitslim apply`, `vitslim compress` or `vitslim export`")
        if metadata.get(CHECKSUM_KEY) != json.dumps(_contract_checksum(metadata)):
            why = ("has no checksum: written by an earlier vitslim" if CHECKSUM_KEY not in metadata
                   else "was changed after it was saved (checksum mismatch)")
            raise ModelLoadError(f"{str(path)!r}: its vitslim contract {why}; re-create it with `vitslim export`, "
                                 "`vitslim apply` or `vitslim compress`")
        return _checked(lambda: Contract.from_metadata(metadata, "contract"), path)
    return _contract(_read_meta(path), path)


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (the graph's weights are not read)."""
    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as err:  # protobuf reports damaged files as several exception types
        raise ModelLoadError(f"{str(path)!r} is not a readable ONNX file ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]})") from None


def _checked(read, path: Path) -> Contract:
    try:
        return read()
    except ConfigError as err:
        raise ModelLoadError(f"{str(path)!r}: unusable vitslim contract: {err}; re-create the artifact "
                             "with `vitslim apply`, `vitslim compress` or `vitslim export`") from None


def _redo(path: Path) -> str:
    return f"re-create {str(path)!r} with this vitslim (`vitslim apply`, `quantize`, `prune` or `compress`)"


def _read_meta(path: Path) -> dict:
    """``vitslim.json`` of a saved folder, checked: fields and types, format, checksum, and that
    ``model.safetensors`` is the file it was saved with."""
    meta_path, weights = path / META_FILE, path / WEIGHTS_FILE
    if not meta_path.is_file():
        legacy = next((f for f in LEGACY_FILES if (path / f).exists()), None)
        if legacy:
            raise ModelLoadError(f"{str(path)!r} holds a {legacy}: a model saved by `{LEGACY_FILES[legacy]}` of "
                                 f"vitslim 0.1 (format 1), before one artifact format; this vitslim reads format "
                                 f"{FORMAT}: save it again with this version's `{LEGACY_FILES[legacy]} ... --out DIR`")
        raise ModelLoadError(f"{str(path)!r} is not a vitslim artifact: expected an .onnx file or a folder with "
                             f"{META_FILE} (made by `vitslim apply`, `quantize`, `prune` or `compress`)")
    try:
        meta = check_mapping(read_data_file(meta_path, META_FILE), META_FILE)
        if meta.get("format") != FORMAT:
            raise ConfigError(f"format {brief(meta.get('format'))}; this vitslim reads format {FORMAT}")
        missing = sorted(set(META_FIELDS) - set(meta))
        if missing:
            raise ConfigError(f"missing field(s) {missing}")
        for key, hint in META_FIELDS.items():
            check_type(meta[key], hint, key)
        if meta["checksum"] != _checksum({k: v for k, v in meta.items() if k != "checksum"}):
            raise ConfigError("it was changed after it was saved (checksum mismatch), and an edited artifact "
                              "computes something else silently")
    except ConfigError as err:
        raise ModelLoadError(f"{str(meta_path)!r} cannot be used: {err}; {_redo(path)}") from None
    if not weights.is_file() or meta["weights_sha256"] != file_sha256(weights):
        raise ModelLoadError(f"{str(weights)!r} is missing or not the weights file {META_FILE} was saved with "
                             f"(an interrupted copy, or files mixed from two folders); {_redo(path)}")
    return meta


def _contract(meta: dict, path: Path) -> Contract:
    contract = _checked(lambda: Contract.from_dict(meta["contract"], "contract"), path / META_FILE)
    try:
        _check_state(meta["state"], recipe_from_dict(contract.recipe))
        _check_source(contract.source)
    except ConfigError as err:
        raise ModelLoadError(f"{str(path / META_FILE)!r} cannot be used: {err}; {_redo(path)}") from None
    return contract


def _check_state(state: dict, recipe: Recipe) -> None:
    """The recorded state must be exactly what the recipe's steps leave behind."""
    kinds = [registry.method_of(s).step for s in recipe.steps]
    bad = [k for k in kinds if k not in FOLDER_STEPS] or [
        type(s).__name__ for s in recipe.steps if type(s).__name__ == "HybridQuantConfig"]
    if bad:
        raise ConfigError(f"its recipe has a {bad[0]!r} step, which a saved folder cannot hold")
    unknown = sorted(set(state) - {"prune", "quantize"})
    if unknown:
        raise ConfigError(f"state: unknown field(s) {brief(unknown)}")
    for kind in ("prune", "quantize"):
        if (state.get(kind) is not None) != (kind in kinds):
            raise ConfigError(f"state.{kind} and the recipe's steps disagree (one has a {kind} step, the other not)")
    if state.get("quantize") is not None:
        QuantConfig.from_dict(check_mapping(state["quantize"], "state.quantize"))
    if state.get("prune") is not None:
        _prune_record(state["prune"])


def _prune_record(record: Any) -> dict:
    record = check_mapping(record, "state.prune")
    hints = {"blocks": list[int], "heads": list[int], "mlp": list[int], "head_index": list[list[int]],
             "channel_index": list[list[int]], "macs_kept": float}
    unknown = sorted(set(record) - set(hints))
    if unknown or not {"blocks", "heads", "mlp"} <= set(record):
        raise ConfigError(f"state.prune needs blocks, heads and mlp (and may hold {sorted(hints)})")
    for key, value in record.items():
        check_type(value, hints[key], f"state.prune.{key}")
    n = len(record["blocks"])
    if not (len(record["heads"]) == len(record["mlp"]) == n and len(set(record["blocks"])) == n
            and all(0 <= b < 256 for b in record["blocks"]) and all(v > 0 for v in record["heads"] + record["mlp"])):
        raise ConfigError("state.prune: blocks (distinct, 0..255), heads and mlp (positive) must be lists of one "
                          "length")
    for key, counts in (("head_index", record["heads"]), ("channel_index", record["mlp"])):
        index = record.get(key)
        if index is not None and (len(index) != n or any(
                len(kept) != c or len(set(kept)) != c or min(kept, default=0) < 0 for kept, c in zip(index, counts))):
            raise ConfigError(f"state.prune.{key} must list, per kept block, its distinct original indices")
    return record


def _check_source(source: dict) -> None:
    """The architecture an artifact names must be buildable without files, downloads or
    unbounded sizes: a timm name with bounded keywords, the reference, or an embedded
    Hugging Face config."""
    name = source["name"]
    kwargs = source.get("timm_kwargs") or {}
    if name.startswith(HF_PREFIX):
        hf = check_mapping(source.get("hf"), "source.hf") if source.get("hf") is not None else None
        if hf is None or not isinstance(hf.get("config"), dict) or not isinstance(hf.get("preprocessing"), dict):
            raise ConfigError("source.hf: a Hugging Face model's artifact carries its config and preprocessing")
        for key, limit in HF_CONFIG_LIMITS.items():
            value = hf["config"].get(key)
            for v in value if isinstance(value, list) else [value]:
                if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= limit):
                    raise ConfigError(f"source.hf.config.{key}={brief(value)}: expected whole numbers in 1..{limit}")
        if kwargs:
            raise ConfigError("source.timm_kwargs: a Hugging Face model takes none")
        return
    for key, value in kwargs.items():
        if key not in TIMM_KWARGS:
            raise ConfigError(f"source.timm_kwargs: {brief(key)} is not a keyword an artifact may pass to timm "
                              f"(allowed: {sorted(TIMM_KWARGS)})")
        if key == "pretrained_cfg_overlay":
            overlay = check_mapping(value, "source.timm_kwargs.pretrained_cfg_overlay")
            for name, item in overlay.items():
                if name not in CFG_OVERLAY_KEYS:
                    raise ConfigError(f"source.timm_kwargs.pretrained_cfg_overlay: {brief(name)} is not one of "
                                      f"{sorted(CFG_OVERLAY_KEYS)}")
                _check_kwarg(f"pretrained_cfg_overlay.{name}", item, CFG_OVERLAY_KEYS[name])
        else:
            _check_kwarg(key, value, TIMM_KWARGS[key])


def _check_kwarg(key: str, value: Any, limit: int | None) -> None:
    where = f"source.timm_kwargs.{key}"
    values = value if isinstance(value, list) and len(value) <= 4 else [value]
    for v in values:
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            bound = limit if limit is not None else 1e6
            if not (0 <= check_type(v, float, where) <= bound):
                raise ConfigError(f"{where}={brief(value)}: expected a number in 0..{bound}")
        elif isinstance(v, str):
            if len(v) > MAX_STR or any(c in v for c in "/\\~") or v.startswith("."):
                raise ConfigError(f"{where}={brief(value)}: a path is not a constructor keyword")
        else:
            raise ConfigError(f"{where}={brief(value)}: expected a number, a name or true/false")


def _architecture(source: dict) -> nn.Module:
    name = source["name"]
    if name == REFERENCE_NAME:
        return create_reference_architecture()
    if name.startswith(HF_PREFIX):
        return hf_architecture(source["hf"]["config"], source["hf"]["preprocessing"])
    return load_model(name, pretrained=False, **(source.get("timm_kwargs") or {}))


def _structure(source: dict, recipe: Recipe, state: dict, path: Path) -> nn.Module:
    """The saved model's modules (weights not yet set): the architecture, cut to the pruned
    shapes, with the recipe's token reduction, dtype and quantizers in place."""
    try:
        model = _architecture(source)
    except ModelLoadError:
        raise
    except Exception as err:  # timm and transformers reject unusable arguments with many exception types
        raise ModelLoadError(f"{str(path / META_FILE)!r}: model {source['name']!r} cannot be built from its "
                             f"recorded arguments ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                             f"{_redo(path)}") from None
    if state.get("prune") is not None:
        _apply_pruned_shapes(model, state["prune"], path)
    for step in recipe.steps:
        if isinstance(step, QuantConfig):
            install(with_rotation(model, step_config := QuantConfig.from_dict(state["quantize"])), step_config)
        elif isinstance(step, PruneConfig):  # applied above, from the recorded shapes
            getattr(model, SHAPES_ATTR)["config"] = step.to_dict()
        else:  # token reduction, dtype: no weights of their own
            registry.apply_(model, step)
    return model.eval()


def _apply_pruned_shapes(model: nn.Module, record: dict, path: Path) -> None:
    parts = vit_parts(model)
    depth = len(parts.blocks)
    too_big = [b for b, h, m in zip(record["blocks"], record["heads"], record["mlp"])
               if b >= depth or h > parts.blocks[b].num_heads or m > parts.blocks[b].fc1.out_features]
    index_ok = all(max(kept, default=-1) < size for key, sizes in (
        ("head_index", [bp.num_heads for bp in parts.blocks]), ("channel_index", [bp.fc1.out_features for bp in
                                                                                 parts.blocks]))
        for kept, size in zip(record.get(key) or [], [sizes[b] for b in record["blocks"] if b < depth]))
    if too_big or not index_ok:
        raise ModelLoadError(f"{str(path / META_FILE)!r}: its pruned shapes list blocks, heads or MLP channels the "
                             f"model does not have; {_redo(path)}")
    plan = Plan(tuple(record["blocks"]), {b: tuple(range(n)) for b, n in zip(record["blocks"], record["heads"])},
                {b: tuple(range(n)) for b, n in zip(record["blocks"], record["mlp"])})
    apply_plan(model, plan)
    info = getattr(model, SHAPES_ATTR)
    info.update({k: record[k] for k in (*INDEX_KEYS, "macs_kept") if k in record})


def _rebuild(path: Path, meta: dict, contract: Contract) -> nn.Module:
    recipe, state, weights = recipe_from_dict(contract.recipe), meta["state"], path / WEIGHTS_FILE
    shapes = tensor_shapes(weights, _redo(path))
    with torch.device("meta"):  # allocates nothing: a folder naming a huge model is refused cheaply
        probe = _structure(contract.source, recipe, state, path)
    _check_fits(probe, shapes, contract, path)
    model = _structure(contract.source, recipe, state, path)
    tensors = read_tensors(weights, _redo(path))
    if state.get("quantize") is not None:
        restore_quantized(model, QuantConfig.from_dict(state["quantize"]), tensors, str(weights), installed=True)
    else:
        load_state_dict_strict(model, tensors, source=str(weights))
    return model.eval()


def _check_fits(probe: nn.Module, shapes: dict[str, tuple[int, ...]], contract: Contract, path: Path) -> None:
    """The architecture must have the weights file's tensors, of the file's shapes (quantizer
    state aside, whose shapes calibration sets), and give the output the contract promises."""
    own = probe.state_dict()
    missing = sorted(set(own) - set(shapes))
    modules = dict(probe.named_modules())
    unexpected = sorted(k for k in set(shapes) - set(own) if not is_empty_buffer(modules, k))
    wrong = [k for k, t in own.items() if k in shapes and tuple(t.shape) != shapes[k] and "quantizer" not in k]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} is {shapes[wrong[0]]} in the file but {tuple(own[wrong[0]].shape)} in the model")
        raise ModelLoadError(f"{str(path / WEIGHTS_FILE)!r} does not fit the model {META_FILE} describes "
                             f"({detail}); {_redo(path)}")
    built, promised = output_of(probe), contract.output
    if built["kind"] != promised["kind"] or built.get("classes") != promised.get("classes") or (
            promised["kind"] == "features" and built.get("dim") != promised.get("dim")):
        raise ModelLoadError(f"{str(path / META_FILE)!r}: the contract says the output is {_output(promised)}, but "
                             f"the model gives {_output(built)}; {_redo(path)}")


def _check_onnx_output(model: OnnxModel, contract: Contract, path: Path) -> None:
    width = model.output_shape[-1] if model.output_shape else None
    promised = contract.num_classes or contract.output.get("dim")
    if isinstance(width, int) and isinstance(promised, int) and width != promised:
        raise ModelLoadError(f"{str(path)!r}: the contract says the output is {_output(contract.output)}, but the "
                             f"graph gives {width} values per image; re-create it with `vitslim export`")


def _output(output: dict) -> str:
    return (f"{output.get('classes')} class logits" if output.get("kind") == "logits"
            else f"features of dim {output.get('dim')}")
