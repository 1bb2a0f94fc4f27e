"""The bench plot reads honestly: linear axes from 0, a 1x line where there is an eager row, a
number on every bar, and rows that did not run listed instead of drawn as zero-length bars.

Draws a tiny synthetic result set (no benchmark runs), so it takes well under a second.
"""

import os
import sys

import pytest

matplotlib = pytest.importorskip("matplotlib")  # the "bench" extra; installed by .ci/setup
matplotlib.use("Agg")  # no display in CI; bench/run.py draws on a bare Figure anyway

from matplotlib.container import BarContainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.run import plot, plot_figure, plot_title  # noqa: E402


def _row(op, provider, mode, median_ms, status="ok", shape="N=8,V=16", dtype="float32"):
    return {"op": op, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype, "status": status,
            "median_ms": median_ms, "peak_extra_MiB": None, "GBps": None, "TFLOPs": None,
            "fraction_of_limit": None}


ROWS = [
    # An op with an eager baseline: a speed-up panel.
    _row("token_logprobs", "gtalign_fast[cpu]", "fwd", 23.5),
    _row("token_logprobs", "torch-eager", "fwd", 37.8),
    _row("token_logprobs", "trl", "fwd", 40.0),
    _row("token_logprobs", "liger", "fwd", None, status="not installed: liger_kernel"),
    _row("token_logprobs", "torch-compile", "fwd", None, status="error: RuntimeError: boom"),
    # An e2e-style op without an eager row: a time panel.
    _row("grpo_step", "gtalign_fast", "full", 139.0, shape="model=tiny,H=64"),
    _row("grpo_step", "trl", "full", 280.0, shape="model=tiny,H=64"),
]
ENV = {"device": "Test CPU (2 cores)", "torch": "2.99.0", "triton": "9.9.9", "commit": "abc1234",
       "date": "2026-01-01T00:00:00+00:00"}


def _axes_by_op(figure):
    return {axis.get_title(loc="left").split(" · ")[0]: axis for axis in figure.axes}


def _bars(axis):
    return [bar for container in axis.containers if isinstance(container, BarContainer) for bar in container]


def _near(xy, tip):
    return xy is not None and abs(xy[0] - tip[0]) < 1e-9 and abs(xy[1] - tip[1]) < 1e-9


def _one_x_lines(axis):
    return [line for line in axis.get_lines()
            if line.get_linestyle() == "--" and set(line.get_xdata()) == {1.0}]


def test_plot_axes_are_linear_from_zero_with_labelled_bars(tmp_path):
    figure = plot_figure(ROWS, plot_title("default", ENV))
    axes = _axes_by_op(figure)
    assert set(axes) == {"token_logprobs", "grpo_step"}
    for axis in axes.values():
        assert axis.get_xscale() == "linear"
        assert axis.get_xlim()[0] == 0
        bars = _bars(axis)
        labels = [text for text in axis.texts if text.get_text().strip()]
        # Every bar has its own label at its tip (bar_label puts it at the bar's end, centred).
        for bar in bars:
            tip = (bar.get_x() + bar.get_width(), bar.get_y() + bar.get_height() / 2)
            assert any(_near(getattr(text, "xy", None), tip) and "ms" in text.get_text() for text in labels), tip

    speedup = axes["token_logprobs"]
    assert len(_one_x_lines(speedup)) == 1
    # Only the three timed rows are bars; eager is exactly 1x, ours 37.8 / 23.5 = 1.6x.
    widths = sorted(bar.get_width() for bar in _bars(speedup))
    assert widths[1] == 1.0 and abs(widths[-1] - 37.8 / 23.5) < 1e-9
    texts = [text.get_text() for text in speedup.texts]
    assert "23.5 ms · 1.6x" in texts
    # Rows that did not run are listed by name and reason, with no bar.
    assert "not installed: liger_kernel" in texts and "error: RuntimeError: boom" in texts
    assert {"liger", "torch-compile"} <= {tick.get_text() for tick in speedup.get_yticklabels()}

    time_panel = axes["grpo_step"]
    assert not _one_x_lines(time_panel)
    assert sorted(bar.get_width() for bar in _bars(time_panel)) == [139.0, 280.0]
    assert "ms" in time_panel.get_xlabel()

    title = figure.get_suptitle() if hasattr(figure, "get_suptitle") else figure._suptitle.get_text()  # < 3.8
    for part in ("Test CPU (2 cores)", "torch 2.99.0", "triton 9.9.9", "commit abc1234"):
        assert part in title

    path = tmp_path / "plot.png"
    assert plot(ROWS, str(path), "t") is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_timed_rows_writes_nothing(tmp_path):
    path = tmp_path / "plot.png"
    rows = [_row("token_logprobs", "liger", "fwd", None, status="not installed: liger_kernel")]
    assert plot_figure(rows, "t") is None
    assert plot(rows, str(path), "t") == "nothing timed: no plot"
    assert not path.exists()
