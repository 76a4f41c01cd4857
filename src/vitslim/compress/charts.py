"""The report's charts as inline SVG, drawn directly (no plotting library): fidelity against
speed for every candidate, and each block's sensitivity to quantization."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 700, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 50  # plot margins (px): room for tick labels and axis titles
BLUE, RED, ORANGE, GREY = "#4477aa", "#cc3311", "#ee7733", "#ccc"
LOSS_FLOOR = 1e-7  # 1 − cosine of identical outputs, drawn at the bottom of the log axis


@dataclass(frozen=True)
class Point:
    """A candidate on the fidelity/speed chart."""

    name: str
    speedup: float
    cosine: float
    on_frontier: bool = False
    chosen: bool = False


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (steps of 1, 2 or 5 × 10^k) covering [low, high]."""
    raw = (high - low) / max(count, 1) or 1.0
    step = next(s for m in (1, 2, 5, 10) if (s := m * 10 ** math.floor(math.log10(raw))) >= raw)
    first = math.floor(low / step) * step
    return [round(first + i * step, 10) for i in range(math.ceil(round((high - first) / step, 9)) + 1)]


def _axis(low: float, high: float, start: float, end: float, log: bool = False) -> Callable[[float], float]:
    """Data value → pixel along an axis from ``start`` to ``end`` (pixels)."""
    f = math.log10 if log else float
    a, b = f(low), f(high)
    return lambda v: start + (f(v) - a) / ((b - a) or 1.0) * (end - start)


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-family="system-ui, sans-serif"{extra}>{escape(text)}</text>')


def _frame(x_ticks: Sequence[tuple[float, str]], y_ticks: Sequence[tuple[float, str]], x_title: str,
           y_title: str) -> list[str]:
    """Grid, tick labels and axis titles; ticks are (pixel, label)."""
    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
             f'fill="none" stroke="#888"/>']
    for x, label in x_ticks:
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" stroke="{GREY}"/>')
        parts.append(_text(x, HEIGHT - BOTTOM + 16, label, anchor="middle"))
    for y, label in y_ticks:
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{GREY}"/>')
        parts.append(_text(LEFT - 6, y + 4, label, anchor="end"))
    parts.append(_text((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 12, x_title, 12, "middle"))
    middle = (TOP + HEIGHT - BOTTOM) / 2
    parts.append(_text(16, middle, y_title, 12, "middle", f' transform="rotate(-90 16 {middle:.1f})"'))
    return parts


def _svg(parts: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img"><title>{escape(title)}</title>' + "".join(parts) + "</svg>")


def frontier_chart(points: Sequence[Point], target_speedup: float | None = None,
                   target_cosine: float | None = None) -> str:
    """1 − cosine (log scale, lower is better) against speedup; the frontier joined, the chosen
    candidate ringed, a speed or fidelity target as a dashed line. Only finite figures are drawn."""
    points = [p for p in points if math.isfinite(p.speedup) and math.isfinite(p.cosine)]
    loss = [max(1 - p.cosine, LOSS_FLOOR) for p in points]
    target_loss = max(1 - target_cosine, LOSS_FLOOR) if target_cosine is not None else None
    xs = [p.speedup for p in points] + ([target_speedup] if target_speedup is not None else []) or [1.0]
    ys = loss + ([target_loss] if target_loss is not None else []) or [LOSS_FLOOR, 1.0]
    x_ticks = nice_ticks(min(xs) * 0.9, max(xs) * 1.1)
    decades = list(range(math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys))) + 1))
    decades = decades if len(decades) > 1 else [decades[0], decades[0] + 1]
    x = _axis(x_ticks[0], x_ticks[-1], LEFT, WIDTH - RIGHT)
    y = _axis(10.0 ** decades[0], 10.0 ** decades[-1], HEIGHT - BOTTOM, TOP, log=True)
    parts = _frame([(x(t), f"{t:g}×") for t in x_ticks], [(y(10.0 ** d), f"1e{d}") for d in decades],
                   "throughput ratio to FP32 (same run, this CPU)", "1 − feature cosine vs FP32 (lower is better)")
    if target_speedup is not None:
        parts.append(f'<line x1="{x(target_speedup):.1f}" y1="{TOP}" x2="{x(target_speedup):.1f}" '
                     f'y2="{HEIGHT - BOTTOM}" stroke="{RED}" stroke-dasharray="5 4"/>')
        parts.append(_text(x(target_speedup) + 4, TOP + 12, f"target speedup {target_speedup:g}", 10,
                           extra=f' fill="{RED}"'))
    if target_loss is not None:
        parts.append(f'<line x1="{LEFT}" y1="{y(target_loss):.1f}" x2="{WIDTH - RIGHT}" y2="{y(target_loss):.1f}" '
                     f'stroke="{RED}" stroke-dasharray="5 4"/>')
        parts.append(_text(WIDTH - RIGHT - 4, y(target_loss) - 4, f"target cosine {target_cosine:g}", 10, "end",
                           f' fill="{RED}"'))
    front = sorted((p.speedup, ls) for p, ls in zip(points, loss) if p.on_frontier)
    if len(front) > 1:
        path = " ".join(f"{x(s):.1f},{y(ls):.1f}" for s, ls in front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{BLUE}" stroke-opacity="0.5"/>')
    for p, ls in zip(points, loss):
        parts.append(f'<circle cx="{x(p.speedup):.1f}" cy="{y(ls):.1f}" r="4" fill="{BLUE}"/>')
        if p.chosen:
            parts.append(f'<circle cx="{x(p.speedup):.1f}" cy="{y(ls):.1f}" r="9" fill="none" stroke="{RED}" '
                         'stroke-width="2"/>')
        parts.append(_text(x(p.speedup) + 6, y(ls) - 5, p.name, 10))
    return _svg(parts, "fidelity against speed of every candidate")


def sensitivity_chart(rows: Sequence[dict]) -> str:
    """A bar per block: 1 − feature cosine vs FP32 when only that block is quantized."""
    losses = [max(1 - r["cosine"], 0.0) for r in rows]
    y_ticks = nice_ticks(0.0, max(losses, default=0.0) or 1e-6, 4)
    y = _axis(0.0, y_ticks[-1], HEIGHT - BOTTOM, TOP)
    slot = (WIDTH - LEFT - RIGHT) / max(len(rows), 1)
    centres = [LEFT + slot * (i + 0.5) for i in range(len(rows))]
    parts = _frame([(c, str(r["block"])) for c, r in zip(centres, rows)], [(y(t), f"{t:.2g}") for t in y_ticks],
                   "block", "1 − cosine vs FP32")
    for c, ls in zip(centres, losses):
        parts.append(f'<rect x="{c - slot * 0.35:.1f}" y="{y(ls):.1f}" width="{slot * 0.7:.1f}" '
                     f'height="{HEIGHT - BOTTOM - y(ls):.1f}" fill="{ORANGE}"/>')
    return _svg(parts, "sensitivity of each block to quantization")
