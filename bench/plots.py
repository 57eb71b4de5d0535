"""Plotting for the reports: files only (the Agg backend, never a window), and log axes
labelled with the measured values rather than powers of ten."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot, ticker  # noqa: E402

__all__ = ["pyplot", "plain_log_axis", "plain_numbers"]


def plain_numbers(axis: Any) -> None:
    """A log axis with ticks at 1, 2 and 5 of every decade, written as plain numbers."""
    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plain_log_axis(axis: Any, ticks: list[float]) -> None:
    """Ticks at the measured values, written as they are."""
    axis.set_ticks(sorted(set(ticks)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())
