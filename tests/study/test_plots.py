"""The comparisons figure: what it draws, read from its matplotlib artists (the PNG itself is checked by eye)."""

from __future__ import annotations

from contextlib import contextmanager

from matplotlib.colors import to_hex

from gpt2lab.study import plots


def _row(variant: str, mean: float, low: float, high: float, significant: bool) -> dict:
    return {"variant": variant, "reference": "baseline", "mean_diff": str(mean), "low": str(low),
            "high": str(high), "holm_significant": str(significant)}  # fmt: skip


def _draw(monkeypatch, tmp_path, rows: list[dict]):
    """Draw the comparisons figure and return its axes (the real plot_file writes the PNG as usual)."""
    drawn = []
    real = plots.plot_file

    @contextmanager
    def keeping(*args, **kwargs):
        with real(*args, **kwargs) as axes:
            drawn.extend(axes)
            yield axes

    monkeypatch.setattr(plots, "plot_file", keeping)
    plots._plot_comparisons(tmp_path / "comparisons.png", rows)
    assert (tmp_path / "comparisons.png").stat().st_size > 0
    return drawn[0]


def test_an_off_scale_row_keeps_its_holm_colour_and_says_so(monkeypatch, tmp_path):
    rows = [_row("gqa", 0.004, -0.001, 0.009, False), _row("mqa", 0.008, -0.006, 0.022, False),
            _row("window", 0.006, -0.006, 0.017, False), _row("learned", 0.5, 0.45, 0.55, True),
            _row("wide", -0.012, -0.02, -0.004, True)]  # fmt: skip
    ax = _draw(monkeypatch, tmp_path, rows)
    significant, plain = to_hex("C2"), to_hex("C0")
    (note,) = [t for t in ax.texts if "off the scale" in t.get_text()]
    assert note.get_text().startswith("+0.500 [+0.450, +0.550]")
    assert to_hex(note.get_color()) == significant  # learned differs after Holm: green, as the label says
    limit = ax.get_xlim()[1]
    assert limit < 0.5 and abs(note.xy[0]) < limit  # drawn inside the axis, at its edge
    points = [line for line in ax.lines if len(line.get_xdata()) == 1]  # the means and the arrow
    colours = {round(float(line.get_xdata()[0]), 3): to_hex(line.get_color()) for line in points}
    assert colours[0.004] == colours[0.008] == colours[0.006] == plain
    assert colours[-0.012] == significant
    assert colours[round(0.97 * limit, 3)] == significant  # the arrow at the edge


def test_a_non_significant_off_scale_row_stays_plain(monkeypatch, tmp_path):
    rows = [_row("gqa", 0.004, -0.001, 0.009, False), _row("mqa", 0.006, -0.002, 0.01, False),
            _row("learned", 0.3, -0.1, 0.7, False)]  # fmt: skip
    ax = _draw(monkeypatch, tmp_path, rows)
    (note,) = [t for t in ax.texts if "off the scale" in t.get_text()]
    assert to_hex(note.get_color()) == to_hex("C0")
