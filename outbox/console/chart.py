"""The overview's chart as SVG geometry, computed here and drawn by a template (no JS).

Only numbers and fixed words reach the SVG, so nothing from a row can end up in it. Imports
only the store's ``Activity`` view.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from outbox.store.console_views import Activity

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 200, 40, 24, 10
COLOURS = {"committed": "#2e7d32", "parked": "#c62828", "retried": "#ef6c00"}


@dataclass(frozen=True)
class Line:
    name: str
    colour: str
    points: str  # "x,y x,y …"
    total: int


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    top: int
    bottom_y: int
    peak: int
    lines: list[Line]
    ticks: list[Tick]


def _x(minute: int, minutes: int) -> float:
    return round(LEFT + (WIDTH - LEFT - 4) * minute / max(minutes - 1, 1), 1)


def _y(count: int, peak: int) -> float:
    return round(HEIGHT - BOTTOM - (HEIGHT - BOTTOM - TOP) * count / peak, 1)


def _ticks(activity: Activity, every: int = 60) -> list[Tick]:
    return [
        Tick(_x(m, activity.minutes), (activity.start + timedelta(minutes=m)).strftime("%H:%M"))
        for m in range(0, activity.minutes, every)
    ]


def chart(activity: Activity) -> Chart:
    """Per-minute polylines of each series on one scale (the busiest minute at the top)."""
    peak = max((max(v, default=0) for v in activity.series.values()), default=0) or 1
    lines = [
        Line(
            name,
            COLOURS.get(name, "#555"),
            " ".join(f"{_x(m, len(values))},{_y(c, peak)}" for m, c in enumerate(values)),
            sum(values),
        )
        for name, values in activity.series.items()
    ]
    return Chart(WIDTH, HEIGHT, LEFT, TOP, HEIGHT - BOTTOM, peak, lines, _ticks(activity))
