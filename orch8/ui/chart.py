"""The throughput chart as inline SVG coordinates (no charting library, no script)."""

from __future__ import annotations

from dataclasses import dataclass

from orch8.ui.throughput import KEEP_S, Point

WIDTH, HEIGHT = 600, 120


@dataclass(frozen=True)
class Chart:
    completed: str  # SVG polyline points
    failed: str
    peak: float  # per second at the top of the chart
    latest_completed: float
    latest_failed: float
    empty: bool


def throughput_chart(points: list[Point]) -> Chart:
    """Scale the history into the chart's box: time on x (newest right), rate on y."""
    if not points:
        return Chart("", "", 0.0, 0.0, 0.0, True)
    newest = points[-1].at
    peak = max(max(p.completed_per_s, p.failed_per_s) for p in points) or 1.0

    def line(values: list[tuple[float, float]]) -> str:
        return " ".join(
            f"{WIDTH - (newest - at) / KEEP_S * WIDTH:.1f},{HEIGHT - value / peak * HEIGHT:.1f}"
            for at, value in values)

    return Chart(
        completed=line([(p.at, p.completed_per_s) for p in points]),
        failed=line([(p.at, p.failed_per_s) for p in points]),
        peak=peak,
        latest_completed=points[-1].completed_per_s,
        latest_failed=points[-1].failed_per_s,
        empty=False,
    )
