"""The search report: one self-contained HTML file (charts inlined as SVG) and a Markdown
summary, so the outcome can be understood by looking, not by reading logs."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from vitslim.artifact import read_contract
from vitslim.bench import Interval
from vitslim.compress.charts import Point, frontier_chart, sensitivity_chart
from vitslim.compress.search import (
    EARLY_STOP_ROUNDS,
    MORE_ROUNDS,
    NOT_A_VIT,
    CandidateResult,
    SearchResult,
    pareto_front,
)
from vitslim.deploy.snippet import usage_markdown
from vitslim.output import fmt, significant, vitslim_command, write_text_atomic
from vitslim.output import markdown_text as _md

COLUMNS = [("name", "recipe"), ("speedup", "× FP32 (95% CI)"), ("cosine", "cosine"), ("sqnr_db", "SQNR dB"),
           ("top1_agreement", "top-1 agree"), ("top1", "top-1"), ("accuracy_drop", "top-1 drop pts"),
           ("latency_ms", "batch ms"), ("size_mb", "size MB"), ("runtime", "runtime"), ("seconds", "eval s"),
           ("status", "note")]


def _status(c: CandidateResult) -> str | None:
    """Why a candidate's figures are rougher or may not hold here (None when nothing to say)."""
    parts = [f"decided in {c.stopped_early} rounds"] if c.stopped_early else []
    parts += [c.note] if c.note else []
    return "; ".join(parts) or None


def speedup_text(c: CandidateResult) -> str | None:
    """``3.4× (3.0–3.8)``: the median ratio and its interval, at the precision it allows."""
    if c.speedup is None:
        return None
    if c.speedup_low is None or c.speedup_low == c.speedup_high:  # e.g. the baseline itself
        return f"{c.speedup:.2f}×"
    return Interval(c.speedup, c.speedup_low, c.speedup_high, 0.95, c.rounds).text()


def _fixed(value: float | None, decimals: int) -> str | None:
    return None if value is None else fmt(value) if not math.isfinite(value) else f"{value:.{decimals}f}"


def candidate_row(c: CandidateResult) -> dict:
    """A candidate's table row, each figure at the precision it is measured to."""
    figures = {"speedup": speedup_text(c), "cosine": _fixed(c.cosine, 5), "sqnr_db": _fixed(c.sqnr_db, 1),
               "top1_agreement": _fixed(c.top1_agreement, 4), "top1": _fixed(c.top1, 4),
               "accuracy_drop": _fixed(c.accuracy_drop, 2),
               "latency_ms": significant(c.latency_ms) if c.latency_ms is not None else None,
               "size_mb": significant(c.size_mb) if c.size_mb is not None else None,
               "runtime": c.runtime, "seconds": _fixed(c.seconds, 0)}
    return {"name": c.name, **figures, "status": _status(c)}


def _plottable(c: CandidateResult) -> bool:
    return not c.error and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (c.speedup, c.cosine))


def frontier_svg(result: SearchResult) -> str:
    """Fidelity against speed of every candidate with finite figures: frontier joined, choice
    ringed, the target drawn."""
    ok = [c for c in result.candidates if _plottable(c)]
    if not ok:  # every candidate failed: nothing to draw
        return "<p>No candidate has figures to plot; see the errors below.</p>"
    front = {id(c) for c in pareto_front(ok)}
    chosen = result.chosen.name if result.chosen else None
    points = [Point(c.name, c.speedup, c.cosine, id(c) in front, c.name == chosen) for c in ok]
    t = result.target
    return frontier_chart(points, target_speedup=t.value if t.metric == "speedup" else None,
                          target_cosine=t.value if t.metric == "fidelity" else None)


def _shown(rows: list[dict], columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The columns some row has a figure for (no top-1 columns without labels)."""
    return [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]


def html_table(rows: list[dict], columns: list[tuple[str, str]], highlight: str | None) -> str:
    columns = _shown(rows, columns)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = []
    for r in rows:
        cls = ' class="chosen"' if r.get("name") == highlight else ""
        cells = "".join(f"<td>{html.escape(fmt(r.get(k)))}</td>" for k, _ in columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary_lines(result: SearchResult, model_name: str) -> list[str]:
    s, c = result.settings, result.chosen
    verdict = "meets" if result.met else "does NOT meet"
    lines = [f"Model: {model_name}. Target: {result.target.metric} = {result.target.value}."]
    if c:
        about = f" ({c.recipe['description']})" if c.recipe.get("description") else ""
        lines.append(f"Chosen: {c.name}{about} — it {verdict} the target: "
                     f"speedup {speedup_text(c)}, feature cosine {_fixed(c.cosine, 5)}, "
                     f"SQNR {_fixed(c.sqnr_db, 1)} dB, {significant(c.latency_ms)} ms per batch of "
                     f"{s.get('batch_size')}.")
    if c and c.top1 is not None:
        lines.append(f"Top-1 on the {s.get('n_eval')} evaluation images: {fmt(c.top1 * 100, 4)}% "
                     f"({fmt(c.accuracy_drop, 3)} points below FP32), top-1 agreement with FP32 "
                     f"{fmt(c.top1_agreement, 4)}.")
    lines.append(f"Why: {result.reason}.")
    lines += [f"Within noise: {note}." for note in result.within_noise]
    lines.append(f"Images: {s.get('n_calib')} for calibration, {s.get('n_eval')} (disjoint) for fidelity; "
                 f"speed: batch {s.get('batch_size')}, {s.get('iters')} rounds per candidate interleaved with the "
                 "FP32 original, the speedup the median ratio over rounds with its 95% interval; fewer rounds "
                 f"once the interval decides (after at least {EARLY_STOP_ROUNDS}: wholly below the speed needed "
                 "to be chosen, or wholly at or above a speed target), up to "
                 f"{MORE_ROUNDS}× as many while it straddles the decision. Fidelities closer than their "
                 "standard errors count as ties, and so do overlapping speed intervals.")
    disturbed = [c.name for c in result.candidates if c.disturbed]
    if disturbed:
        lines.append(f"Timed while other processes took the CPU (twice): {', '.join(disturbed)}; their speed "
                     "figures are not to be trusted: search again on a quiet machine.")
    lines += [f"Left out on this CPU: {o['name']} ({o['reason']})." for o in result.left_out]
    if result.not_applicable:
        lines.append(f"Not tried: {', '.join(result.not_applicable)} ({NOT_A_VIT}).")
    m = result.machine
    features = f" [{m['cpu_features']}]" if m.get("cpu_features") else ""
    lines.append(f"Machine: {m.get('cpu')}{features}, {m.get('cores')} cores, {m.get('torch_threads')} threads; "
                 f"Python {m.get('python')}, torch {m.get('torch')}, timm {m.get('timm')}, "
                 f"onnxruntime {m.get('onnxruntime')}.")
    if m.get("engine"):
        lines.append(f"Built and measured on {m['engine']}; timed on {m['timed_on']} (the machine above).")
    return lines


def write_report(result: SearchResult, out_dir: str | Path, model_name: str) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    rows = [candidate_row(c) for c in result.candidates]
    chosen = result.chosen.name if result.chosen else None
    failed = [c for c in result.candidates if c.error]
    summary = _summary_lines(result, model_name)
    sens = ""
    if result.sensitivity:
        sens = (f"<h2>Per-block sensitivity</h2><p>1 − feature cosine vs FP32 when only this block is "
                f"quantized ({result.sensitivity[0]['preset']}); the tallest bars are the blocks to keep "
                "at higher precision.</p>"
                + sensitivity_chart(result.sensitivity))
    errors = "".join(f"<li><b>{html.escape(c.name)}</b>: {html.escape(c.error)}</li>" for c in failed)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vitslim compress — {html.escape(model_name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.chosen {{ background: #fde8e4; font-weight: bold; }}
.verdict {{ font-size: 1.2em; padding: .6em; background: {'#e6f4ea' if result.met else '#fdecea'}; }}
</style></head><body>
<h1>vitslim compress: {html.escape(model_name)}</h1>
<p class="verdict">{'✓ target met' if result.met else '✗ target not met'}: {html.escape(result.reason)}</p>
<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in summary)}</ul>
<h2>Fidelity vs speed</h2>
<div id="frontier">{frontier_svg(result)}</div>
<h2>Every candidate</h2>
{html_table(rows, COLUMNS, chosen)}
{'<h3>Failed candidates</h3><ul>' + errors + '</ul>' if failed else ''}
{sens}
</body></html>
"""
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    usage = usage_section(result, model_name)
    if usage:
        page = page.replace("</body>", _markdown_to_html(usage) + "</body>")
    write_text_atomic(html_path, page)
    columns = _shown(rows, COLUMNS)
    md = ["# vitslim compress report", "", *[f"- {_md(line)}" for line in summary], "",
          "| " + " | ".join(h for _, h in columns) + " |", "|" + " --- |" * len(columns)]
    md += ["| " + " | ".join(_md(fmt(r.get(k))) for k, _ in columns) + " |" for r in rows]
    md += [f"- {_md(c.name)} failed: {_md(c.error)}" for c in failed]
    write_text_atomic(md_path, "\n".join(md) + "\n" + ("\n" + usage if usage else ""))
    return html_path, md_path


def usage_section(result: SearchResult, model_name: str) -> str:
    """ "How to use this model": the saved artifact, how to reproduce it, a tested snippet."""
    if not result.artifact:
        return ""
    contract = read_contract(result.artifact)
    s, src = result.settings, contract.source
    checkpoint = ("--checkpoint", src["checkpoint"]) if src.get("checkpoint") else ()
    rebuild = vitslim_command("apply", "recipe.yaml", model_name, *checkpoint, "--data", Path(result.data).name,
                              "--calib-images", s.get("n_calib"), "--seed", s.get("seed"), "--out",
                              Path(result.artifact).name)
    return (usage_markdown(result.artifact, result.data, contract, result.data)
            + "\nThe same artifact again (same calibration images, same code path as the search):\n\n"
            + f"```bash\n{rebuild}\n```\n")


def _markdown_to_html(text: str) -> str:
    """The few constructs the usage section uses: headings, paragraphs, code spans, fenced code."""
    parts, code, buf = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if code is None:
                code = []
            else:
                parts.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
                code = None
        elif code is not None:
            code.append(line)
        elif line.startswith("## "):
            parts.append(f"<h2>{_inline_html(line[3:])}</h2>")
        elif line.strip():
            buf.append(line)
        elif buf:
            parts.append(f"<p>{_inline_html(' '.join(buf))}</p>")
            buf = []
    if buf:
        parts.append(f"<p>{_inline_html(' '.join(buf))}</p>")
    return "\n".join(parts)


# A code span: a run of backticks not escaped, its text, the same run (``markdown_code``'s fences).
_CODE_SPAN = re.compile(r"(?<!\\)(`+)(.+?)(?<!`)\1(?!`)")


def _inline_html(markdown: str) -> str:
    """Prose written with ``markdown_text`` and ``markdown_code`` as HTML: code spans in <code>,
    everything escaped."""
    parts, end = [], 0
    for span in _CODE_SPAN.finditer(markdown):
        code = span.group(2)
        if len(span.group(1)) > 1 and code.startswith(" ") and code.endswith(" "):
            code = code[1:-1]  # a longer fence is padded with one space on each side
        parts += [html.escape(_plain(markdown[end:span.start()])), f"<code>{html.escape(code)}</code>"]
        end = span.end()
    return "".join([*parts, html.escape(_plain(markdown[end:]))])


def _plain(markdown: str) -> str:
    """Prose written with ``markdown_text``, back to plain text (for HTML, escaped there)."""
    return html.unescape(re.sub(r"\\(.)", r"\1", markdown))
