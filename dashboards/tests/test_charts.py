"""The SVG bar chart's layout: stacked in order, scaled to a round top, every label kept in the table."""
from dashboards.charts import Series, bar_chart, nice_ceiling


def test_nice_ceiling():
    assert [nice_ceiling(v) for v in (0, 1, 3, 7, 12, 240, 251, 9000)] == [1, 1, 5, 10, 20, 250, 500, 10000]


def test_bars_stack_in_series_order_and_fit_the_plot():
    chart = bar_chart(title="t", unit="tokens", labels=["a", "b"],
                      series=[Series("prompt", [30, 0]), Series("completion", [20, 10])])
    x0, y0, x1, y1 = chart.plot
    assert chart.ticks[-1].value == 50 and chart.ticks[-1].y == y0
    a_prompt, a_completion, b_completion = chart.bars
    assert (a_prompt.series, a_completion.series, b_completion.series) == (0, 1, 1)
    assert a_prompt.y + a_prompt.height == y1 and a_completion.y + a_completion.height == a_prompt.y
    assert a_completion.y == y0  # 50 of 50: the full height
    assert b_completion.height == (y1 - y0) / 5
    assert list(chart.rows) == [("a", [30, 20], 50), ("b", [0, 10], 10)]
    assert not chart.empty and bar_chart(title="t", unit="", labels=["a"], series=[Series("x", [0])]).empty


def test_x_labels_are_thinned_but_rows_are_not():
    labels = [str(d) for d in range(31)]
    chart = bar_chart(title="t", unit="", labels=labels, series=[Series("x", list(range(31)))])
    assert len(chart.x_labels) <= 12 and len(list(chart.rows)) == 31
