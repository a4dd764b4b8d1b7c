"""Bar charts drawn on the server as SVG: axes with units, a legend and a table fallback.

The pages stay plain HTML (no chart library, no script): a view builds a `BarChart` from
rows a selector aggregated in SQL, and `dashboards/_chart.html` draws it. Series stack in
the order given; every bar has a <title> (the exact figure on hover) and the same numbers
are in a table under the chart for screen readers and for copying.
"""
import math
from dataclasses import dataclass, field

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 28
MAX_X_LABELS = 12


@dataclass(frozen=True)
class Series:
    name: str
    values: list  # one number per label


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int  # index of the series (its colour: class "s{series}")
    title: str


@dataclass(frozen=True)
class Tick:
    y: float
    value: float


@dataclass(frozen=True)
class XLabel:
    x: float
    text: str


@dataclass
class BarChart:
    title: str
    unit: str  # what the y axis counts, e.g. "tokens"
    labels: list[str]
    series: list[Series]
    width: int = WIDTH
    height: int = HEIGHT
    bars: list[Bar] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    x_labels: list[XLabel] = field(default_factory=list)
    plot: tuple = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)  # x0, y0, x1, y1

    @property
    def empty(self) -> bool:
        return not any(v for s in self.series for v in s.values)

    @property
    def rows(self):
        """(label, value per series, total) for the table fallback."""
        for i, label in enumerate(self.labels):
            values = [s.values[i] for s in self.series]
            yield label, values, sum(values)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^n at or above value (the axis' top)."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def bar_chart(*, title: str, unit: str, labels: list[str], series: list[Series], ticks: int = 4) -> BarChart:
    """Lay out a stacked bar chart: one bar per label, the series stacked bottom to top."""
    chart = BarChart(title=title, unit=unit, labels=list(labels), series=list(series))
    x0, y0, x1, y1 = chart.plot
    totals = [sum(s.values[i] for s in series) for i in range(len(labels))]
    top = nice_ceiling(max(totals, default=0))
    scale = (y1 - y0) / top
    chart.ticks = [Tick(y1 - top * k / ticks * scale, top * k / ticks) for k in range(ticks + 1)]
    if not labels:
        return chart
    slot = (x1 - x0) / len(labels)
    width = max(1.0, slot * 0.8)
    for i, label in enumerate(labels):
        base = y1
        for s_index, s in enumerate(series):
            value = s.values[i]
            if not value:
                continue
            height = value * scale
            base -= height
            chart.bars.append(Bar(round(x0 + i * slot + (slot - width) / 2, 2), round(base, 2), round(width, 2),
                                  round(height, 2), s_index, f"{label} · {s.name}: {value:,} {unit}"))
    every = max(1, math.ceil(len(labels) / MAX_X_LABELS))
    chart.x_labels = [XLabel(round(x0 + i * slot + slot / 2, 2), label)
                      for i, label in enumerate(labels) if i % every == 0]
    return chart
