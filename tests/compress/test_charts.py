"""The report's charts: valid SVG drawn without a plotting library, figures where they belong."""

import itertools
import math
import xml.etree.ElementTree as ET

from vitslim.compress.charts import Point, frontier_chart, nice_ticks, sensitivity_chart

SVG = "{http://www.w3.org/2000/svg}"


def test_nice_ticks_are_round_and_cover_the_range():
    for low, high in [(0.9, 6.8), (0.0, 0.0123), (1.8, 2.2), (0.95, 1.05)]:
        ticks = nice_ticks(low, high)
        steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
        assert ticks[0] <= low and ticks[-1] >= high and len(steps) == 1 and 3 <= len(ticks) <= 8
        step = steps.pop()
        assert round(step / 10 ** math.floor(math.log10(step)), 6) in (1, 2, 5)


def test_frontier_chart_places_each_candidate_and_rings_the_chosen():
    points = [Point("fp32", 1.0, 1.0, on_frontier=True), Point("fast", 6.0, 0.999, on_frontier=True, chosen=True),
              Point("slow<b>&", 3.0, 0.99), Point("broken", float("nan"), 0.9)]
    root = ET.fromstring(frontier_chart(points, target_speedup=2.0))
    circles = root.findall(f"{SVG}circle")
    dots = {(float(c.get("cx")), float(c.get("cy"))) for c in circles if c.get("r") == "4"}
    ring = [c for c in circles if c.get("r") == "9"]
    assert len(dots) == 3 and len(ring) == 1  # the NaN candidate is left out
    by_x = sorted(dots)
    # y grows downwards in SVG: fp32 (1 − cosine at the floor) lowest, "slow" (0.01) highest, "fast" (0.001) between
    assert by_x[0][1] > by_x[2][1] > by_x[1][1]
    assert (float(ring[0].get("cx")), float(ring[0].get("cy"))) == by_x[2]  # ringed: the chosen (fastest) one
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "slow<b>&" in labels and "target speedup 2" in labels  # names as text, escaped in the markup
    target = next(line for line in root.findall(f"{SVG}line") if line.get("stroke-dasharray"))
    assert by_x[0][0] < float(target.get("x1")) < by_x[1][0]  # 2× between the 1× and 3× candidates


def test_sensitivity_chart_bar_heights_follow_the_losses():
    rows = [{"block": i, "cosine": c} for i, c in enumerate([0.999, 0.99, 0.9999])]
    root = ET.fromstring(sensitivity_chart(rows))
    bars = [r for r in root.findall(f"{SVG}rect") if r.get("fill") != "none"]
    heights = [float(b.get("height")) for b in bars]
    assert len(bars) == 3 and heights[1] > heights[0] > heights[2] > 0
    assert abs(heights[0] / heights[1] - 0.1) < 0.01  # 1e-3 vs 1e-2: a linear axis
