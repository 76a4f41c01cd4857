"""Fuzz every parser a user feeds vitslim and count what escapes.

    uv run python benchmarks/fuzz_inputs.py                  # 10 000 inputs per parser
    uv run python benchmarks/fuzz_inputs.py --budget 500 --parsers recipe,image

Inputs are generated from valid seeds by mutation (characters flipped, inserted and deleted;
syntax tokens, aliases, tags, huge/NaN numbers, deep nesting and hostile names spliced in;
parsed values replaced by values of other types), plus random folder trees and damaged image
files. Each input ends as one of:

  accepted  the parser returned, and the result passed its check (round trip, finite, no file
            outside its folder, every image listed);
  refused   a VitslimError: what the CLI prints as one line;
  crash     any other exception (a traceback for the user);
  hang      no answer within --timeout seconds;
  wrong     accepted, but the result failed its check (a silent wrong result).

The goal is 0 crashes, hangs and wrong results; the table and the first failures (with the
input and the traceback's last lines) are printed, and the exit code is 1 if any was found.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from vitslim.errors import VitslimError

TOKENS = ["{", "}", "[", "]", ":", ",", "-", " ", "\n", "\n  ", "'", '"', "&a ", "*a", "&b [*a, *a, *a, *a]", "<<: *a",
          "!!python/object:os.system", "!!binary", "!!float", "---", "...", "NaN", ".nan", ".inf", "-.inf", "1e999",
          "-1", "0", "0.5", "1.5", "99999999999999999999999", "true", "null", "~", '"5"', "\t", "\x00", "\ufeff",
          "é", "$\\cmd{$", "[/oops]", "../../x", "/etc/x", "%", "!", "#", "?", "|", ">", "@"]


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ["accepted", "refused", "crash", "hang", "wrong"], 0))
    slowest_ms: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)


class Hang(Exception):
    pass


class Wrong(Exception):
    """An accepted input whose result fails its check."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- mutation -------------------------------------------------------------------------------------

def mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        i = rng.randint(0, len(text))
        op = rng.random()
        if op < 0.25:
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif op < 0.4:
            text = text[:i] + text[i + rng.randint(1, 8):]
        elif op < 0.5:
            text = text[:i] + chr(rng.choice([rng.randint(0, 127), rng.randint(0, 0x2FFF)])) + text[i + 1:]
        elif op < 0.55:
            depth = rng.choice([40, 300, 5000])
            text = text[:i] + "[" * depth + "]" * depth + text[i:]
        elif op < 0.6:
            bomb = "&a0 [x, x, x, x, x, x, x, x]" + "".join(
                f", &a{k} [" + ", ".join([f"*a{k - 1}"] * 8) + "]" for k in range(1, rng.randint(2, 9)))
            text = text[:i] + "[" + bomb + "]" + text[i:]
        elif op < 0.65:
            text = text[:i] + "x" * rng.choice([200, 5000, 200_000]) + text[i:]
        else:
            j = rng.randint(0, len(text))
            text = text[:i] + text[j:j + rng.randint(1, 30)] + text[i:]  # duplicate a fragment
    return text


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choices = [None, True, False, 0, -1, 1, 8, 4, 3, 1000, 2 ** 40, -(2 ** 70), 0.5, 1.5, -0.0, 1e308, float("nan"),
               float("inf"), "", "x", "tome", "onnx", "w8a8", "bfloat16", "uniform", "mse", "5", "../../x", "[/oops]",
               "$\\cmd{$", "<script>", "a" * 2000]
    if depth < 3 and rng.random() < 0.3:
        if rng.random() < 0.5:
            return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
        return {rng.choice(["name", "steps", "r", "bits", "x", "", "1"]): random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return rng.choice(choices)


def mutate_value(rng: random.Random, data: Any) -> Any:
    """Replace, delete or add one value somewhere inside ``data`` (a copy)."""
    data = json.loads(json.dumps(data))
    holders = []

    def walk(node):
        if isinstance(node, dict):
            holders.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            holders.append(node)
            for v in node:
                walk(v)

    walk(data)
    if not holders:
        return random_value(rng)
    node = rng.choice(holders)
    if isinstance(node, dict):
        op = rng.random()
        if node and op < 0.6:
            node[rng.choice(list(node))] = random_value(rng)
        elif node and op < 0.8:
            del node[rng.choice(list(node))]
        else:
            node[rng.choice(["extra", "name", "steps", "bits", "r", "config", "model"])] = random_value(rng)
    else:
        if node and rng.random() < 0.6:
            node[rng.randrange(len(node))] = random_value(rng)
        else:
            node.append(random_value(rng))
    return data


def dump(rng: random.Random, data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, allow_nan=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=rng.random() < 0.5)


def mutated_data_text(rng: random.Random, seeds: list[Any], fmt: str) -> str:
    data = rng.choice(seeds)
    for _ in range(rng.randint(0, 3)):
        data = mutate_value(rng, data)
    text = dump(rng, data, fmt)
    return mutate_text(rng, text) if rng.random() < 0.5 else text


# --- parsers --------------------------------------------------------------------------------------

class Parser:
    name = ""

    def __init__(self, work: Path, rng: random.Random) -> None:
        self.work, self.rng = work, rng

    def generate(self) -> Any:
        raise NotImplementedError

    def run(self, value: Any) -> None:
        """Parse ``value``; raise Wrong if an accepted result fails its check."""
        raise NotImplementedError

    def describe(self, value: Any) -> str:
        return repr(value)[:300]


class DataFileParser(Parser):
    """A YAML or JSON file mutated from ``self.seeds`` (plain-data documents)."""

    def generate(self):
        fmt = self.rng.choice(["yaml", "json"])
        return fmt, mutated_data_text(self.rng, self.seeds, fmt)

    def write(self, value, stem: str) -> Path:
        fmt, text = value
        path = self.work / f"{stem}.{'json' if fmt == 'json' else 'yaml'}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return path


class RecipeParser(DataFileParser):
    name = "recipe file (YAML/JSON)"

    def __init__(self, work, rng):
        super().__init__(work, rng)
        from vitslim.recipes import BUILTIN_RECIPES

        self.seeds = [r.to_dict() for r in BUILTIN_RECIPES.values()] + [
            {"name": "q", "steps": [{"tokens": {"method": "evit", "keep_rate": 0.7, "blocks": [3, 6]}},
                                    {"quantize": {"config": {"weight_bits": 6, "post_gelu": {"quantizer": "adalog"}},
                                                  "calib_images": 8}}]}]


    def run(self, value):
        from vitslim.compress import load_recipe, save_recipe
        from vitslim.output import safe_filename

        recipe = load_recipe(self.write(value, "recipe"))
        file_name = safe_filename(recipe.name, ".onnx")
        if "/" in file_name or file_name.startswith(".") or not recipe.name.isprintable():
            raise Wrong(f"unsafe name {recipe.name!r} -> {file_name!r}")
        save_recipe(recipe, self.work / "again.yaml")
        if load_recipe(self.work / "again.yaml") != recipe:
            raise Wrong("does not round-trip")


class QuantConfigParser(DataFileParser):
    name = "QuantConfig file (YAML/JSON)"

    def __init__(self, work, rng):
        super().__init__(work, rng)
        from vitslim.quant.config import PRESETS

        self.seeds = [c.to_dict() for c in PRESETS.values()] + [{}, {"weight_bits": 4, "block_bits": [4, 8]}]


    def run(self, value):
        from vitslim.quant.config import VALID_BITS, QuantConfig

        config = QuantConfig.load(self.write(value, "config"))
        round_trip = QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        if config.weight_bits not in VALID_BITS or round_trip != config:
            raise Wrong("invalid config accepted or no round trip")


class QuantJsonParser(Parser):
    name = "saved model folder: vitslim.json (+ model.safetensors)"

    def __init__(self, work, rng):
        super().__init__(work, rng)
        import timm
        import torch

        import vitslim
        from vitslim import quant
        from vitslim.artifact import ModelSource

        torch.manual_seed(0)
        self.kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **self.kwargs).eval()
        self.folder = work / "q"
        with contextlib.redirect_stderr(io.StringIO()), _quiet_warnings():
            vitslim.save(
                quant.quantize_(copy.deepcopy(model), quant.preset("minmax-w8a8"), torch.randn(2, 3, 32, 32)),
                self.folder,
                ModelSource("vit_tiny_patch16_224", timm_kwargs=self.kwargs),
            )
        self.good_text = (self.folder / "vitslim.json").read_text()
        self.good = json.loads(self.good_text)

    def generate(self):
        from vitslim.artifact.store import _checksum
        from vitslim.quant.config import PRESETS

        rechecksum = self.rng.random() < 0.6
        if self.rng.random() < 0.3:
            return mutate_text(self.rng, self.good_text), False
        meta = self.good
        if self.rng.random() < 0.35:  # another valid config over these weights
            meta = {**meta, "state": {**meta["state"], "quantize": self.rng.choice(list(PRESETS.values())).to_dict()}}
        else:
            for _ in range(self.rng.randint(1, 3)):
                meta = mutate_value(self.rng, meta)
        if rechecksum and isinstance(meta, dict):
            with contextlib.suppress(TypeError, ValueError):
                meta["checksum"] = _checksum({k: v for k, v in meta.items() if k != "checksum"})
        return json.dumps(meta, allow_nan=True), rechecksum

    def run(self, value):
        import torch

        import vitslim

        text, rechecksum = value
        (self.folder / "vitslim.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            with _quiet_warnings():
                model = vitslim.load(self.folder).model
        finally:
            (self.folder / "vitslim.json").write_text(self.good_text)
        with contextlib.suppress(ValueError):
            if json.loads(text) != self.good and not rechecksum:
                raise Wrong("an edited vitslim.json was loaded")
        with torch.no_grad():
            if not torch.isfinite(model(torch.randn(1, 3, 32, 32))).all():
                raise Wrong("loaded model outputs NaN/Inf")


class TargetParser(Parser):
    name = "--target"

    def generate(self):
        seed = self.rng.choice(["speedup=2", "fidelity=0.99", "latency_ms=50", "speedup=3.5", "fidelity=1"])
        return mutate_text(self.rng, seed) if self.rng.random() < 0.9 else seed

    def run(self, value):
        from vitslim.compress import Target

        target = Target.parse(value)
        if (
            not math.isfinite(target.value)
            or target.value <= (-1 if target.metric == "fidelity" else 0)
            or (target.metric == "fidelity" and target.value > 1)
        ):
            raise Wrong(f"accepted {target}")


class TokensParser(Parser):
    """Knobs through ``tokens.token_config`` and ``reduce_tokens_`` on a tiny ViT: model-dependent checks included."""

    name = "token-reduction knobs (--method, --r, ...)"

    def __init__(self, work, rng):
        super().__init__(work, rng)
        self.model = _tiny_vit()

    def generate(self):
        from vitslim.tokens import TOKEN_CONFIGS

        configs = {c.method: c for c in TOKEN_CONFIGS}
        method = self.rng.choice([*configs, "x"])
        plausible = {
            "r": [0, 1, 3, 8, 12, [1, 2], [0, 9]],
            "keep_rate": [0.5, 0.9, 1],
            "budget": [0.3, 1],
            "blocks": [[0], [1], [0, 1], [5]],
            "prop_attn": [True, False],
            "tau_sim": [0, 1.0],
            "tau_info": [20.0],
            "zzz": [1],
        }
        knobs = {}
        own = [k for k in plausible if method in configs and k in {f.name for f in dataclasses.fields(configs[method])}]
        for _ in range(self.rng.randint(0, 3)):
            name = self.rng.choice(own if own and self.rng.random() < 0.8 else list(plausible))
            knobs[name] = self.rng.choice(plausible[name]) if self.rng.random() < 0.7 else random_value(self.rng)
        return method, knobs

    def run(self, value):
        import torch

        from vitslim import tokens

        method, knobs = value
        patched = tokens.reduce_tokens_(copy.deepcopy(self.model), tokens.token_config(method, **knobs))
        with torch.no_grad():
            if not torch.isfinite(patched(torch.randn(2, 3, 32, 32))).all():
                raise Wrong("NaN output")


class FolderParser(Parser):
    name = "image folder layout"
    NAMES = ("a", "b", "n01440764", "n01443537", ".h", "x.jpg")
    LEAVES = ("x.jpg", "y.PNG", ".z.jpg", "n01440764_q.JPEG", "notes.txt", "d.jpeg", "n01443537_w.webp")

    def generate(self):
        return [
            (
                [self.rng.choice(self.NAMES) for _ in range(self.rng.choice([0, 0, 1, 1, 2, 3]))],
                self.rng.choice(self.LEAVES),
                self.rng.random() < 0.15,
            )
            for _ in range(self.rng.randint(0, 8))
        ]

    def run(self, tree):
        import shutil

        from vitslim.data import IMAGE_SUFFIXES, imagenet_wnids, list_images

        root = self.work / "tree"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        for folders, leaf, as_dir in tree:
            path = root.joinpath(*folders, leaf)
            with contextlib.suppress(FileExistsError, NotADirectoryError):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.mkdir() if as_dir else path.touch()
        samples = list_images(root)
        expected = {
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        }
        if {p for p, _ in samples} != expected or len(samples) != len(expected):
            raise Wrong(
                f"listed {sorted(str(p.relative_to(root)) for p, _ in samples)}, "
                f"expected {sorted(str(p.relative_to(root)) for p in expected)}"
            )
        wnids = imagenet_wnids()
        for path, label in samples:
            if path.parent == root and label != wnids.get(path.name.split("_")[0], -1):
                raise Wrong(f"{path.name} labelled {label}")
            if path.parent != root and path.parent.name in wnids and label != wnids[path.parent.name]:
                raise Wrong(f"{path} labelled {label}")


class ImageParser(Parser):
    name = "image file"

    def __init__(self, work, rng):
        super().__init__(work, rng)
        gen = np.random.default_rng(0)
        rgb = gen.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        images = [(Image.fromarray(rgb), fmt) for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")]
        images += [
            (Image.fromarray(gen.integers(0, 65536, (9, 7)).astype(np.uint16)), "PNG"),
            (Image.fromarray(gen.random((6, 5)).astype(np.float32), mode="F"), "TIFF"),
            (Image.fromarray(rgb).convert("CMYK"), "JPEG"),
            (Image.fromarray(rgb).convert("P"), "PNG"),
            (Image.fromarray(rgb).convert("LA"), "PNG"),
            (Image.fromarray(rgb).convert("1"), "TIFF"),
        ]
        self.seeds = []
        for image, fmt in images:
            buf = io.BytesIO()
            image.save(buf, fmt)
            self.seeds.append((fmt.lower(), buf.getvalue()))

    def generate(self):
        suffix, data = self.rng.choice(self.seeds)
        data = bytearray(data)
        for _ in range(self.rng.randint(1, 6)):
            i = self.rng.randrange(len(data))
            op = self.rng.random()
            if op < 0.5:
                data[i] = self.rng.randrange(256)
            elif op < 0.7:
                del data[i : i + self.rng.randint(1, 64)]
            elif op < 0.85:  # large dimensions in a header field
                data[i : i + 4] = self.rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x10\x00", b"\x00\x00\x00\x00"])
            else:
                data[i:i] = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 32)))
        return suffix, bytes(data)

    def describe(self, value):
        return f"{value[0]}: {value[1][:80]!r}... ({len(value[1])} bytes)"

    def run(self, value):
        from vitslim.data import read_image

        suffix, data = value
        path = self.work / f"x.{suffix}"
        path.write_bytes(data)
        image = read_image(path)
        if image.mode != "RGB" or np.asarray(image).dtype != np.uint8:
            raise Wrong(f"mode {image.mode}")


class ContractParser(Parser):
    name = "artifact contract (vitslim.json / ONNX metadata)"

    def __init__(self, work, rng):
        super().__init__(work, rng)
        from vitslim.artifact.contract import ModelSource, contract_for

        model = _tiny_vit()
        recipe = {"name": "q", "steps": [{"tokens": {"method": "tome", "r": 2}}, {"quantize": {"preset": "w8a8"}}]}
        self.seeds = [
            contract_for(
                model,
                ModelSource("vit_tiny_patch16_224", None, {"img_size": 32}),
                recipe,
                {"data": "images", "images": 8, "seed": 0},
                "k" * 20,
            ).to_dict()
        ]
        self.folder = work / "artifact"
        self.folder.mkdir()

    def generate(self):
        if self.rng.random() < 0.5:  # vitslim.json of a saved folder
            text = mutated_data_text(self.rng, [{"contract": c, "quant_config": None} for c in self.seeds], "json")
            return "folder", text
        contract = self.rng.choice(self.seeds)
        for _ in range(self.rng.randint(1, 3)):
            contract = mutate_value(self.rng, contract)
        if not isinstance(contract, dict):
            contract = {"preprocessing": contract}
        metadata = {f"vitslim.{k}": json.dumps(v, allow_nan=True) for k, v in contract.items()}
        if metadata and self.rng.random() < 0.4:
            key = self.rng.choice(sorted(metadata))
            metadata[key] = mutate_text(self.rng, metadata[key])
        return "metadata", metadata

    def run(self, value):
        import torch
        from PIL import Image

        from vitslim.artifact import read_contract
        from vitslim.artifact.contract import Contract, describe_preprocessing

        kind, data = value
        if kind == "folder":
            (self.folder / "vitslim.json").write_text(data, encoding="utf-8", errors="surrogatepass")
            contract = read_contract(self.folder)
        else:
            contract = Contract.from_metadata(data)
        describe_preprocessing(contract.preprocessing)
        transform = contract.transform()
        size = tuple(contract.preprocessing["input_size"])
        if max(size + tuple(contract.preprocessing["resize"])) <= 256:  # big ones: built, not run
            x = transform(Image.new("RGB", (40, 30), (9, 99, 199)))
            if tuple(x.shape) != size or not torch.isfinite(x).all():
                raise Wrong(f"the transform gives shape {tuple(x.shape)} (input_size {size}) or non-finite values")


def _tiny_vit():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=10,
    ).eval()


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


PARSERS: dict[str, type[Parser]] = {
    "recipe": RecipeParser,
    "quantconfig": QuantConfigParser,
    "quantjson": QuantJsonParser,
    "target": TargetParser,
    "tokens": TokensParser,
    "folder": FolderParser,
    "image": ImageParser,
    "contract": ContractParser,
}


def fuzz(parser: Parser, budget: int, timeout: float) -> Tally:
    tally = Tally()
    for _ in range(budget):
        value = parser.generate()
        start = time.perf_counter()
        try:
            with time_limit(timeout), _quiet_warnings():
                parser.run(value)
            outcome = "accepted"
        except VitslimError:
            outcome = "refused"
        except Hang:
            outcome = "hang"
        except Wrong as err:
            outcome = "wrong"
            tally.failures.append(("wrong", parser.describe(value), str(err)))
        except Exception:
            outcome = "crash"
            trace = "".join(traceback.format_exc().splitlines(True)[-4:])
            tally.failures.append(("crash", parser.describe(value), trace))
        if outcome == "hang":
            tally.failures.append(("hang", parser.describe(value), f"no answer in {timeout} s"))
        tally.counts[outcome] += 1
        tally.slowest_ms = max(tally.slowest_ms, (time.perf_counter() - start) * 1e3)
    return tally


def run(
    budget: int = 10_000, parsers: list[str] | None = None, seed: int = 0, timeout: float = 10.0, show: int = 3
) -> dict[str, Tally]:
    """Fuzz the chosen parsers; print a table and the first failures; return the tallies."""
    os.environ.setdefault("VITSLIM_QUIET", "1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in parsers or list(PARSERS):
            work = Path(tmp) / key
            work.mkdir()
            rng = random.Random(f"{seed}:{key}")
            results[key] = fuzz(PARSERS[key](work, rng), budget, timeout)
    print("| parser | inputs | accepted | refused (one-line error) | crash | hang | wrong | slowest ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, t in results.items():
        c = t.counts
        print(
            f"| {PARSERS[key].name} | {sum(c.values())} | {c['accepted']} | {c['refused']} | {c['crash']} | "
            f"{c['hang']} | {c['wrong']} | {t.slowest_ms:.0f} |"
        )
    for key, t in results.items():
        for kind, value, detail in t.failures[:show]:
            print(f"\n[{key}] {kind}: {value}\n{detail}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=10_000, help="inputs per parser")
    parser.add_argument("--parsers", default=",".join(PARSERS), help=f"comma list of {', '.join(PARSERS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before an input counts as a hang")
    args = parser.parse_args()
    from vitslim.bench import machine_info

    print(f"machine: {machine_info()['cpu']}; budget {args.budget} per parser, seed {args.seed}")
    results = run(args.budget, args.parsers.split(","), args.seed, args.timeout)
    bad = sum(t.counts["crash"] + t.counts["hang"] + t.counts["wrong"] for t in results.values())
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
