"""The figure helpers every report shares: error bars from an interval's own
bounds that never cross a floor, a log axis where values span decades,
labelled values, empty panels that say so, and the paper's panels drawn
without bars on a truncated axis."""

from __future__ import annotations

import pytest

from figure_checks import texts as _texts, truncated_bars
from gqa_t5x.experiments import figures, paper


def test_error_bars_are_the_intervals_own_bounds_clipped_at_the_floor():
    intervals = [{"mean": 0.002, "low": -0.003, "high": 0.007},  # a 2-round t interval of a time
                 {"mean": 5.0, "low": 4.0, "high": 5.5}]
    means, (below, above) = figures.error_bars(intervals, floor=0.0)
    assert means == [0.002, 5.0]
    assert below == pytest.approx([0.002, 1.0]) and above == pytest.approx([0.005, 0.5])  # asymmetric
    assert all(m - b >= 0 for m, b in zip(means, below))  # no bar below 0 s
    assert min(below + above) >= 0
    # Without a floor the bounds are kept as they are (a difference may be negative).
    _, (below, _) = figures.error_bars(intervals)
    assert below[0] == pytest.approx(0.005)


def test_error_bar_lengths_are_never_negative_even_for_a_mean_outside_its_bounds():
    means, (below, above) = figures.error_bars([{"mean": 1.0, "low": 1.5, "high": 0.5}], floor=0.0)
    assert below == [0.0] and above == [0.0]


@pytest.mark.parametrize("values,decades", [
    ([0.01, 0.02, 1.05], True),  # ours under HuggingFace's: 105x
    ([0.0025, 0.058], True),  # the study's two timed shapes: 23x
    ([0.5, 0.6, 0.8, 2.53], False),  # the paper's time vs groups: 5x
    ([0.0, 3.0, None, float("nan")], False),  # zeros, gaps and NaN are not counted
    ([7.0], False),
])
def test_log_scale_only_where_the_values_span_decades(values, decades):
    assert figures.spans_decades(values) is decades
    fig, (ax,) = figures.panels(1)
    ax.plot(range(len(values)), [v or 0 for v in values])
    assert figures.choose_scale(ax, values) == ("log" if decades else "linear")
    assert ax.get_yscale() == ("log" if decades else "linear")
    if not decades:
        assert ax.get_ylim()[0] == 0  # linear axes start at 0
    figures.pyplot().close(fig)


def test_paper_methods_panel_is_a_labelled_dot_plot_not_bars_on_a_truncated_axis():
    fig, (ax,) = figures.panels(1)
    figures.paper_methods_panel(ax)
    assert not ax.patches and not truncated_bars(ax)
    texts = _texts(ax)
    for value in paper.CONVERSION_METHODS.values():
        assert f"{value:.2f}" in texts
    assert any(f"{paper.CONVERSION_MHA_LARGE:.2f}" in label for label in ax.get_legend_handles_labels()[1])
    figures.pyplot().close(fig)


def test_paper_alpha_panel_labels_every_point():
    fig, (ax,) = figures.panels(1)
    figures.paper_alpha_panel(ax)
    texts = _texts(ax)
    for curve in paper.ALPHA_CURVES.values():
        for value in curve.values():
            assert f"{value:.2f}" in texts
    assert not truncated_bars(ax)
    figures.pyplot().close(fig)


def test_truncated_bar_check_sees_a_truncated_bar_chart():
    fig, (ax,) = figures.panels(1)
    ax.bar([0, 1], [55.5, 55.2])
    assert not truncated_bars(ax)  # matplotlib's bars start at 0
    ax.set_ylim(54.8, 56.2)
    assert truncated_bars(ax)
    figures.pyplot().close(fig)


def test_an_empty_panel_says_no_data():
    fig, (ax,) = figures.panels(1)
    figures.no_data(ax, "no fine-tuned model was scored")
    assert _texts(ax) == ["no fine-tuned model was scored"]
    figures.pyplot().close(fig)
