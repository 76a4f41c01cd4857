"""MkDocs hooks: pages generated from the code and from the benchmarks' results.

- ``<!-- generated: cli-reference -->`` becomes the reference of every ``vitslim`` command, read
  from the Typer app itself (names, arguments, options, types, defaults, help).
- ``<!-- generated: results -->`` becomes one table per result in ``docs/results/*.json``, each
  with the command that produced it, its date, CPU and ISA flags, library versions, model and data.

The JSON layout is described in ``docs/results.md``; ``check_result`` says what a result lacks.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

CLI_MARKER = "<!-- generated: cli-reference -->"
README_START, README_END = "<!-- generated: results summary -->", "<!-- end of generated results summary -->"
RESULTS_MARKER = "<!-- generated: results -->"

# What every result must say, so that a figure is never read without its conditions.
REQUIRED_FIELDS = ("title", "command", "date", "machine", "versions", "model", "data", "columns", "rows")
REQUIRED_MACHINE = ("cpu", "isa")
REQUIRED_DATA = ("name", "images")
# A row's ``<column>_ci`` holds the 95% interval [low, high] of its ``<column>`` value.
INTERVAL_SUFFIX = "_ci"
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill in the generated sections of a page."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if RESULTS_MARKER in markdown:
        results_dir = Path(config["docs_dir"]) / "results"
        markdown = markdown.replace(RESULTS_MARKER, render_results(results_dir))
    return markdown


# ------------------------------------------------------------------------------ CLI reference
def cli_reference() -> str:
    """Markdown for every command of the ``vitslim`` Typer app, in the order ``--help`` lists them."""
    import typer

    from vitslim.cli import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="vitslim")
    sections = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        sections.append(_command_markdown(name, command, command.context_class(command, info_name=name, parent=ctx)))
    return "\n\n".join(sections)


def _command_markdown(name: str, command: Any, ctx: Any) -> str:
    usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), " ".join(command.collect_usage_pieces(ctx)))
    lines = [f"## `vitslim {name}`", "", "```text", f"vitslim {name} {usage}", "```", "",
             html.escape(_plain(command.help or ""), quote=False)]
    params = [p for p in command.get_params(ctx) if p.name != "help"]
    if params:
        lines += ["", "| argument / option | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [_param_row(p, ctx) for p in params]
    return "\n".join(lines)


def _param_row(param: Any, ctx: Any) -> str:
    if param.param_type_name == "argument":
        names = f"`{param.name.upper()}`"
    else:
        names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    default = "required" if param.required else _default(param)
    return f"| {names} | {_type_name(param, ctx)} | {default} | {_cell(param.help or '')} |"


# How the app's own type names read in the reference.
TYPE_NAMES = {"str": "text", "text": "text", "float": "number", "int": "integer", "path": "path", "bool": "flag",
              "boolean": "flag", "list[str]": "text, repeatable", "int range": "integer", "float range": "number"}


def _type_name(param: Any, ctx: Any) -> str:
    shown = param.display_type(ctx) if callable(getattr(param, "display_type", None)) else param.type.name
    shown = str(shown).strip("<>")
    name = TYPE_NAMES.get(shown, shown)
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is None and high is None:
        low, high = getattr(param.type, "min", None) if hasattr(param, "type") else None, None
    bounds = [f"≥ {low}" if low is not None else "", f"≤ {high}" if high is not None and abs(high) < 2**31 else ""]
    return " ".join([name, *[b for b in bounds if b]])


def _default(param: Any) -> str:
    value = param.default
    if value is None or value == () or value == [] or callable(value):
        return ""
    if isinstance(value, bool):
        if param.secondary_opts:
            return f"`{param.opts[0] if value else param.secondary_opts[0]}`"
        return "on" if value else "off"
    return f"`{value}`"


def _plain(text: str) -> str:
    """A docstring's paragraphs, reflowed (Typer keeps the source's line breaks)."""
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


def _cell(text: str) -> str:
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


# ------------------------------------------------------------------------------ results
def check_result(result: dict, where: str = "result") -> list[str]:
    """What ``result`` lacks to be rendered with its conditions (empty when complete)."""
    problems = [f"{where}: no '{f}'" for f in REQUIRED_FIELDS if f not in result]
    machine, data = result.get("machine", {}), result.get("data", {})
    problems += [f"{where}: machine has no '{f}'" for f in REQUIRED_MACHINE if f not in machine]
    problems += [f"{where}: data has no '{f}'" for f in REQUIRED_DATA if f not in data]
    problems += [f"{where}: unknown ISA flag '{f}' (known: {', '.join(ISA_FLAGS)})"
                 for f in machine.get("isa", []) if f not in ISA_FLAGS]
    columns = result.get("columns", {})
    for i, row in enumerate(result.get("rows", [])):
        unknown = set(row) - set(columns) - {f"{key}{INTERVAL_SUFFIX}" for key in columns}
        if unknown:
            problems.append(f"{where}: row {i} has values for no column: {', '.join(sorted(unknown))}")
    return problems


def load_results(results_dir: Path) -> list[tuple[str, dict]]:
    """Every result of every ``*.json`` file under ``results_dir``, as (file name, result),
    after checking each is complete (a ``ValueError`` lists what is missing)."""
    loaded, problems = [], []
    for path in sorted(results_dir.glob("*.json")):
        document = json.loads(path.read_text())
        results = document["results"] if "results" in document else [from_run_record(document, path.stem)]
        for i, result in enumerate(results):
            problems += check_result(result, f"{path.name}, result {i}")
            loaded.append((path.name, result))
    if problems:
        raise ValueError("incomplete results:\n" + "\n".join(problems))
    return loaded


# Result families, in the order the results page and the README show them: key -> heading.
FAMILIES = {"quantization": "Quantization", "tokens": "Token reduction", "pruning": "Structured pruning",
            "hybrids": "Hybrid models", "deploy": "Export and deployment", "compress": "The main job",
            "other": "Other"}


def by_family(results: list[tuple[str, dict]]) -> dict[str, list[tuple[str, dict]]]:
    """``results`` grouped by their ``family`` (``other`` when unknown), in ``FAMILIES`` order."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for source, result in results:
        family = result.get("family") if result.get("family") in FAMILIES else "other"
        groups.setdefault(family, []).append((source, result))
    return {family: groups[family] for family in FAMILIES if family in groups}


def from_run_record(record: dict, benchmark: str) -> dict:
    """A result from a benchmark's flat run record (``command``, ``date``, ``machine`` as
    ``vitslim.bench.machine_info`` gives it, ``cpu_flags``, ``data``, ``rows``): the columns are
    the rows' keys, the model the rows' ``model`` values, the versions the machine's."""
    rows, machine, data = record.get("rows", []), record.get("machine", {}), record.get("data", {})
    columns = {key: key for row in rows for key in row}
    models = list(dict.fromkeys(str(row["model"]) for row in rows if "model" in row))
    images = data.get("images", "")
    counted = sum(v for k, v in data.items() if k in ("calibration", "evaluation") and isinstance(v, int))
    kept = ("command", "date", "family", "headline", "summary", "notes")
    result = {key: record[key] for key in kept if key in record}
    result |= {
        "title": record.get("title", benchmark.replace("_", " ")),
        "description": record.get("caption", ""),
        "machine": {"cpu": machine.get("cpu", ""), "isa": [f for f in record.get("cpu_flags", []) if f in ISA_FLAGS],
                    **({"threads": machine["torch_threads"]} if "torch_threads" in machine else {})},
        "versions": {name: machine[name] for name in ("torch", "timm", "onnxruntime", "openvino", "nncf")
                     if machine.get(name)},
        "model": ", ".join(models) or record.get("model", ""),
        "data": {"name": Path(str(images)).name or str(images), "images": counted or data.get("count", 0),
                 "note": ", ".join(f"{k} {v}" for k, v in data.items() if k != "images")},
        "columns": record.get("columns", columns),
        "rows": rows,
    }
    return result


def render_results(results_dir: Path) -> str:
    """Markdown: per family a heading, then per result its table and the conditions it was measured under."""
    results = load_results(results_dir)
    if not results:
        return "No results are recorded yet."
    sections = []
    for family, members in by_family(results).items():
        sections.append(f"## {FAMILIES[family]}")
        sections += [render_result(result, source) for source, result in members]
    return "\n\n".join(sections)


def readme_summary(results_dir: Path) -> str:
    """The README's results summary: per family one table of the results' ``headline`` rows,
    each row naming its benchmark script and CPU (full tables and commands: the results page).
    A result's ``summary`` says which of its columns label a row and hold fidelity and speed."""
    sections = []
    for family, members in by_family(load_results(results_dir)).items():
        shown = [result for _, result in members if result.get("headline")]
        rows = [row for result in shown for row in _headline_rows(result)]
        if rows:
            commands = list(dict.fromkeys(f"`{result['command']}` ({result['date']})" for result in shown))
            sections.append("\n".join([f"**{FAMILIES[family]}**", "",
                                        "| setting | cosine to FP32 | speed × FP32 | benchmark | CPU |",
                                        "| --- | --- | --- | --- | --- |", *rows, "",
                                        "Commands: " + "; ".join(commands) + "."]))
    return "\n\n".join(sections)


def _headline_rows(result: dict) -> list[str]:
    summary = result.get("summary", {})
    script = next((word for word in result["command"].split() if word.startswith("benchmarks/")), result["command"])
    machine = result["machine"]
    notable = [flag for flag in machine["isa"] if flag not in ("avx2", "avx512f")] or machine["isa"]
    cpu = f"{machine['cpu']} ({', '.join(notable)})" if notable else machine["cpu"]
    lines = []
    for i in result.get("headline", []):
        row = result["rows"][i]
        label = ", ".join(_value(row.get(key)) for key in summary.get("label", list(result["columns"])[:1]))
        fidelity, speed = (_with_interval(row, summary[k]) if k in summary else "—" for k in ("fidelity", "speed"))
        lines.append(f"| {label} | {fidelity} | {speed} | [`{script}`](docs/results.md) | {cpu} |")
    return lines


def render_result(result: dict, source: str) -> str:
    columns: dict[str, str] = result["columns"]
    header = "| " + " | ".join(_cell(label) for label in columns.values()) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_with_interval(row, key) for key in columns) + " |" for row in result["rows"]]
    machine, data = result["machine"], result["data"]
    cpu = machine["cpu"] + (f", {machine['threads']} threads" if "threads" in machine else "")
    isa = ", ".join(machine["isa"]) or "none of " + ", ".join(ISA_FLAGS)
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    images = f"{data['name']}, {data['images']} images" + (f" ({data['note']})" if data.get("note") else "")
    lines = [f"### {result['title']}", ""]
    if result.get("description"):
        lines += [result["description"], ""]
    lines += [header, rule, *body, "",
              f"- **Command:** `{result['command']}`",
              f"- **Date:** {result['date']}",
              f"- **CPU:** {cpu}; ISA: {isa}",
              f"- **Versions:** {versions}",
              f"- **Model:** {result['model']}",
              f"- **Data:** {images}",
              f"- **File:** `docs/results/{source}`"]
    if result.get("notes"):
        lines += [f"- **Notes:** {result['notes']}"]
    return "\n".join(lines)


def _with_interval(row: dict, key: str) -> str:
    """A cell: the value, followed by its 95% interval when the row has one (``2.3 (2.1–2.4)``)."""
    interval = row.get(f"{key}{INTERVAL_SUFFIX}")
    if not interval or row.get(key) is None:
        return _value(row.get(key))
    low, high = interval
    return f"{row[key]:.3g} ({low:.3g}–{high:.3g})"


def _value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.1e}"
    return _cell(str(value))


# ------------------------------------------------------------------------------ README
def synced_readme(readme: str, results_dir: Path) -> str:
    """``readme`` with its results summary (between ``README_START`` and ``README_END``)
    regenerated from ``results_dir``."""
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{readme_summary(results_dir)}\n{README_END}{tail}"


if __name__ == "__main__":  # python tools/docs_hooks.py: rewrite the README's results summary
    root = Path(__file__).resolve().parents[1]
    path = root / "README.md"
    path.write_text(synced_readme(path.read_text(), root / "docs" / "results"))
