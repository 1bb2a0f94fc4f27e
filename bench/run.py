#!/usr/bin/env python
"""Throughput and memory of gtalign_fast's ops side by side with the peers, in one run.

Every ``bench/cases_<op>.py`` contributes rows (see ``bench/common.py``): our backends and every
installed peer (torch eager, torch.compile, TRL, Liger, flash-attn, verl) on the same inputs; a
missing peer shows up as a "not installed" row. Per row: median time, peak extra memory,
achieved GB/s or TFLOP/s and the fraction of this device's limit, measured at the start of the
run (device copy bandwidth, dense matmul throughput), and the speed-up over torch eager.

Output: a markdown table on stdout, and ``<out>/<device>-<suite>.json`` + ``.png`` (a plot).

Examples
--------
    python bench/run.py                       # the default suite, about two minutes
    python bench/run.py --suite full --ops token_logprobs,grpo_loss
    python bench/run.py --suite e2e           # trainer step throughput vs TRL
    python bench/run.py --suite trl           # TRL's GRPOTrainer update, patched vs not
    python bench/run.py --suite real          # SmolLM2-135M-Instruct: generation, decode floor, GRPO step vs TRL
    python bench/run.py --plot-only bench/results/*.json   # redraw the PNGs from committed results
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.common import Case  # noqa: E402

SUITES = ("default", "full", "e2e", "trl", "real")


# ---------------------------------------------------------------------------------------------
# Environment and limits of this device


def git_commit() -> str:
    """Short hash of HEAD (``-dirty`` with uncommitted changes); ``GTALIGN_FAST_COMMIT`` names it
    where the tree is a copy without ``.git`` (a remote GPU machine)."""
    if os.environ.get("GTALIGN_FAST_COMMIT"):
        return os.environ["GTALIGN_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    """A file-name form of a device name: "NVIDIA H200" -> "nvidia-h200",
    "Intel(R) Xeon(R) Processor (2 cores)" -> "intel-xeon-processor-2-cores"."""
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "liger_kernel": _version("liger_kernel"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
    }


def write_side_result(suite: str, fields: dict, device: torch.device = torch.device("cpu")) -> str:
    """Write a side script's result (``bench/decode_linear_rows.py``, ``bench/real_peak_rss.py``) as
    ``bench/results/<device>-<suite>.json``: ``{"suite", "environment", **fields}``. Returns the path."""
    result = {"suite": suite, "environment": environment(device), **fields}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"{device_slug(device_name(device))}-{suite}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print("wrote", path)
    return path


def measure_limits(device: torch.device) -> dict:
    """Measure this device's copy bandwidth (bytes read + written per second) and matmul rate."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    numel = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    source = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    copy_seconds = time_function(lambda: target.copy_(source), device, min_time=0.3)
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_seconds = time_function(lambda: a @ b, device, min_time=0.3)
    return {
        "bandwidth_GBps": 2 * numel * 4 / copy_seconds / 1e9,
        "matmul_TFLOPs": 2 * size**3 / matmul_seconds / 1e12,
        "matmul_dtype": str(dtype).replace("torch.", ""),
    }


# ---------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_function(fn, device: torch.device, min_time: float = 0.5, min_reps: int = 5, max_reps: int = 200) -> float:
    """Median wall time of ``fn`` in seconds (after warm-up). CUDA uses triton's do_bench.

    On CPU, calls slower than a second get 3 timed repetitions instead of ``min_reps`` (the
    default suite must stay around two minutes on a small machine).
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            pass
    begin = time.perf_counter()
    fn()  # warm-up: compilation, allocator
    _sync(device)
    if time.perf_counter() - begin > 1.0:
        min_reps = min(min_reps, 3)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < min_time):
        begin = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_memory(fn, device: torch.device) -> float | None:
    """Peak memory (bytes) allocated by one call of ``fn`` beyond what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (VmHWM, reset
    through /proc/self/clear_refs) minus its resident set before the call; None where Linux does
    not offer that.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return float(peak)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _rss_kib("VmRSS")
        result = fn()
        peak = _rss_kib("VmHWM") - before
        del result
        return float(max(peak, 0) * 1024)
    except (OSError, RuntimeError):
        return None


# ---------------------------------------------------------------------------------------------
# Running the cases


def collect_cases(device: torch.device, suite: str, ops: set[str] | None) -> list[Case]:
    cases: list[Case] = []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "cases_*.py"))):
        module_name = "bench." + os.path.splitext(os.path.basename(path))[0]
        op_name = module_name.split("cases_", 1)[1]
        if ops and op_name not in ops:
            continue
        try:
            module = importlib.import_module(module_name)
            cases.extend(module.cases(device, suite))
        except Exception as error:  # noqa: BLE001 - one broken case file is a row, not a lost run
            first_line = str(error).splitlines()[0][:120] if str(error) else ""
            reason = f"error building cases: {type(error).__name__}: {first_line}"
            cases.append(Case(op_name, "-", "-", {}, "-", None, skip=reason))
    return cases


def run_case(case: Case, device: torch.device, limits: dict) -> dict:
    row = {
        "op": case.op, "provider": case.provider, "mode": case.mode, "shape": case.shape_text(),
        "dtype": case.dtype, "status": "ok", "median_ms": None, "peak_extra_MiB": None,
        "GBps": None, "TFLOPs": None, "fraction_of_limit": None, **case.extra,
    }
    if case.skip:
        row["status"] = case.skip
        return row
    try:
        fn = case.make()
        seconds = time_function(fn, device)
        peak = peak_extra_memory(fn, device)
    except Exception as error:  # noqa: BLE001 - a failing provider is a row, not a crash
        row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        return row
    finally:
        fn = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(case.extra)  # cases may fill `extra` while they run (e.g. a step's split)
    row["median_ms"] = seconds * 1e3
    row["peak_extra_MiB"] = None if peak is None else peak / 2**20
    fractions = []
    if case.bytes:
        row["GBps"] = case.bytes / seconds / 1e9
        fractions.append(row["GBps"] / limits["bandwidth_GBps"])
    if case.flops:
        row["TFLOPs"] = case.flops / seconds / 1e12
        fractions.append(row["TFLOPs"] / limits["matmul_TFLOPs"])
    row["fraction_of_limit"] = max(fractions) if fractions else None
    return row


def add_speedups(rows: list[dict], baseline: str = "torch-eager") -> None:
    """``speedup`` = baseline time / this row's time, within each (op, mode, shape, dtype)."""
    base = {
        (r["op"], r["mode"], r["shape"], r["dtype"]): r["median_ms"]
        for r in rows if r["provider"] == baseline and r["median_ms"]
    }
    for row in rows:
        reference_ms = base.get((row["op"], row["mode"], row["shape"], row["dtype"]))
        row["speedup_vs_eager"] = reference_ms / row["median_ms"] if reference_ms and row["median_ms"] else None


# ---------------------------------------------------------------------------------------------
# Reporting


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    header = ["op", "provider", "mode", "shape", "dtype", "median ms", "peak extra MiB", "GB/s", "TFLOP/s",
              "of limit", "vs eager", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        fraction = f"{100 * r['fraction_of_limit']:.1f}%" if r["fraction_of_limit"] is not None else "-"
        speedup = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
        cells = [r["op"], r["provider"], r["mode"], r["shape"], r["dtype"], _fmt(r["median_ms"]),
                 _fmt(r["peak_extra_MiB"]), _fmt(r["GBps"]), _fmt(r["TFLOPs"]), fraction, speedup, r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The plot. Bars on a log axis cut just under the smallest bar made 23.5 ms vs 37.8 ms look like a
# tenfold gap, so every axis here is linear and starts at 0, and each bar carries its number.

BASELINE = "torch-eager"
_MODE_ORDER = {"fwd": 0, "bwd": 1, "full": 2}
# One colour per provider in every panel, so a reader can follow a provider across panels; ours in
# blues, the eager baseline grey, the peers in distinct hues.
_PROVIDER_COLOURS = {
    "torch-eager": "#8c8c8c", "torch-compile": "#ff7f0e", "trl": "#2ca02c", "liger": "#9467bd",
    "flash-attn": "#8c564b", "verl": "#e377c2", "flashinfer": "#bcbd22", "reference-two-call": "#8c8c8c",
}
_OUR_COLOURS = ("#1f4e99", "#3a7dd8", "#7fb0ee", "#0b2a5c")
_OTHER_COLOURS = ("#17becf", "#d62728", "#7f7f7f", "#aec7e8")


def _provider_colour(provider: str, ours: list[str]) -> str:
    if provider.startswith("gtalign_fast"):
        if provider not in ours:
            ours.append(provider)
        return _OUR_COLOURS[ours.index(provider) % len(_OUR_COLOURS)]
    if provider in _PROVIDER_COLOURS:
        return _PROVIDER_COLOURS[provider]
    return _OTHER_COLOURS[sum(map(ord, provider)) % len(_OTHER_COLOURS)]  # stable across runs


def _format_ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms:,.0f} ms"


def _format_speedup(speedup: float) -> str:
    return f"{speedup:.0f}x" if speedup >= 9.95 else f"{speedup:.2g}x"


def _timed(row: dict) -> bool:
    return bool(row.get("median_ms")) and row.get("status", "ok") == "ok"


def plot_panels(rows: list[dict]) -> list[dict]:
    """Group result rows into plot panels, one per (op, mode, shape, dtype).

    Parameters
    ----------
    rows : list of dict
        Result rows as ``run_case`` writes them (``op``, ``provider``, ``mode``, ``shape``,
        ``dtype``, ``status``, ``median_ms``).

    Returns
    -------
    list of dict
        In the order the bench ran the ops (modes as fwd, bwd, full), each with ``op``, ``mode``,
        ``shape``, ``dtype``, ``family`` (the (shape, dtype) the layout keeps on one line),
        ``baseline_ms`` (the torch eager time, or None when the panel has none: then it plots
        time instead of speed-up), ``bars`` (timed rows, ours first, then eager, then the peers)
        and ``missing`` (rows that did not run, with their reason).
    """
    panels: dict[tuple, dict] = {}
    first_seen: dict[tuple, int] = {}
    for index, row in enumerate(rows):
        key = (row["op"], row["shape"], row["dtype"], row["mode"])
        first_seen.setdefault(key[:3], index)
        panel = panels.setdefault(key, {"op": row["op"], "shape": row["shape"], "dtype": row["dtype"],
                                        "mode": row["mode"], "family": (row["shape"], row["dtype"]),
                                        "baseline_ms": None, "bars": [], "missing": []})
        (panel["bars"] if _timed(row) else panel["missing"]).append(row)
    for panel in panels.values():
        # Ours on top, the eager reference right under it, the peers after: the comparison a reader
        # makes first is ours against eager.
        panel["bars"].sort(key=lambda r: (0 if r["provider"].startswith("gtalign_fast") else
                                          1 if r["provider"] == BASELINE else 2))
        panel["baseline_ms"] = next((r["median_ms"] for r in panel["bars"] if r["provider"] == BASELINE), None)
    return [panels[key] for key in sorted(
        panels, key=lambda k: (first_seen[k[:3]], _MODE_ORDER.get(k[3], len(_MODE_ORDER)), k[3]))]


def _layout(panels: list[dict], columns: int) -> list[list[dict]]:
    """Panels in grid lines of ``columns``; a family (same shape and dtype: the modes of one op, the
    phases of one e2e model) starts a new line rather than break across two, when it fits on one."""
    lines: list[list[dict]] = []
    families: list[list[dict]] = []
    for panel in panels:
        if families and families[-1][0]["family"] == panel["family"]:
            families[-1].append(panel)
        else:
            families.append([panel])
    for family in families:
        for panel in family:
            fits = lines and len(lines[-1]) + (len(family) if panel is family[0] else 1) <= columns
            if not fits:
                lines.append([])
            lines[-1].append(panel)
    return lines


def _wrap(text: str, width: int) -> str:
    """Wrap a shape such as ``model=tiny,H=64,...`` at its commas."""
    lines, line = [], ""
    for part in text.split(","):
        candidate = f"{line},{part}" if line else part
        if line and len(candidate) > width:
            lines.append(line + ",")
            line = part
        else:
            line = candidate
    return "\n".join(lines + [line])


def _draw_panel(axis, panel: dict, colours: list[str], slots: int) -> None:
    """Horizontal bars of one panel: speed-up over eager (with the 1x line) or, without an eager
    row, median time; both on a linear axis from 0. Rows that did not run are listed by name with
    their reason where their bar would be, never drawn as a zero-length bar. ``slots`` rows of
    space (the longest panel on this line), so bars are equally thick side by side."""
    baseline = panel["baseline_ms"]
    bars, missing = panel["bars"], panel["missing"]
    names = [r["provider"] for r in bars] + [r["provider"] for r in missing]
    positions = list(range(len(names)))
    # Linear, explicitly (and first: setting the scale resets the tick formatter set below).
    axis.set_xscale("linear")
    if baseline:
        values = [baseline / r["median_ms"] for r in bars]
        labels = [f"{_format_ms(r['median_ms'])} · {_format_speedup(v)}" for r, v in zip(bars, values)]
        axis.set_xlabel("speed-up over torch eager (longer is faster)", fontsize=7.5)
    else:
        # plot_ms: a row whose timed call is not the unit the panel compares says which time to show
        # (the real suite's decode step times a whole generation and reports one step).
        values = [r.get("plot_ms") or r["median_ms"] for r in bars]
        labels = [_format_ms(v) for v in values]
        axis.set_xlabel("median time, ms (shorter is faster)", fontsize=7.5)
    container = axis.barh(positions[:len(bars)], values, height=0.7,
                          color=[_provider_colour(r["provider"], colours) for r in bars])
    # A white backing, so the 1x line does not run through the label of a bar that ends near 1x.
    axis.bar_label(container, labels=labels, padding=3, fontsize=7.5,
                   bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 0.6})
    if baseline:
        # Only across the bars: through the listed rows it would strike out their reasons.
        axis.plot([1.0, 1.0], [-0.5, len(bars) - 0.5], color="#444444", linestyle="--", linewidth=1,
                  zorder=2.5, gid="eager-1x")
        axis.xaxis.set_major_formatter(lambda value, _: f"{value:g}x")
    for position, row in zip(positions[len(bars):], missing):
        reason = row["status"] if len(row["status"]) <= 58 else row["status"][:57] + "…"
        axis.text(0.01, position, reason, transform=axis.get_yaxis_transform(), va="center", ha="left",
                  fontsize=7, color="#777777", style="italic")
    axis.set_yticks(positions)
    axis.set_yticklabels(names, fontsize=8)
    for tick, _ in zip(axis.get_yticklabels()[len(bars):], missing):
        tick.set_color("#777777")
    axis.set_ylim(max(slots, len(names)) - 0.5, -0.5)  # first row on top
    # Room right of the longest bar for its label; the 1x line always in view.
    right = max(values + ([1.0] if baseline else []), default=1.0)
    axis.set_xlim(0, right * 1.42)
    axis.tick_params(axis="x", labelsize=7)
    axis.grid(axis="x", color="#e6e6e6", linewidth=0.6)
    axis.set_axisbelow(True)
    for side in ("top", "right"):
        axis.spines[side].set_visible(False)
    title = f"{panel['op']} · {panel['mode']}"
    details = _wrap(panel["shape"], 46) + (f" · {panel['dtype']}" if panel["dtype"] not in ("", "-") else "")
    axis.set_title(f"{title}\n{details}", fontsize=8.5, loc="left")


def plot_title(suite: str, env: dict, complete: bool = True) -> str:
    """The figure title: suite, device, the versions that decide the numbers, commit and date.

    Parameters
    ----------
    suite : str
        The suite name (``default``, ``full``, ``e2e``).
    env : dict
        The ``environment`` block of a result file (see ``environment``).
    complete : bool
        False for a run stopped part-way; the title says so.
    """
    versions = [f"torch {env.get('torch')}"]
    if env.get("cuda"):
        versions.append(f"CUDA {env['cuda']}")
    versions.append(f"triton {env.get('triton') or '-'}")
    for key, name in (("trl", "TRL"), ("liger_kernel", "Liger")):
        if env.get(key):
            versions.append(f"{name} {env[key]}")
    when = (env.get("date") or "")[:10]
    line1 = f"gtalign_fast bench, {suite} suite, on {env.get('device', 'unknown device')}"
    line2 = " · ".join(versions + [f"commit {env.get('commit', 'unknown')}"] + ([when] if when else []))
    return f"{line1}{'' if complete else '  (INCOMPLETE RUN)'}\n{line2}"


def plot_figure(rows: list[dict], title: str, columns: int | None = None):
    """Draw the result rows: one panel per (op, mode, shape, dtype).

    Each panel shows horizontal bars of the speed-up over torch eager on a linear axis from 0, with
    a dashed line at 1x, each bar labelled with its median time and speed-up ("0.36 ms · 6.3x");
    a panel without a timed eager row (the e2e suite, steering) shows median time in ms from 0
    instead. Rows that did not run are listed with their reason, without a bar.

    Parameters
    ----------
    rows : list of dict
        Result rows (``run_case``'s, or a result file's ``rows``).
    title : str
        Figure title (see ``plot_title``).
    columns : int, optional
        Panels per line; default: the largest family (modes of one shape), between 2 and 4.

    Returns
    -------
    matplotlib.figure.Figure or None
        None when no row was timed.
    """
    # A bare Figure, not pyplot: no global backend or figure registry to manage, and it renders
    # with Agg when saved to PNG on a machine without a display.
    from matplotlib.figure import Figure

    panels = plot_panels(rows)
    if not any(panel["bars"] for panel in panels):
        return None
    if columns is None:
        family_sizes: dict[tuple, int] = {}
        for panel in panels:
            family_sizes[panel["family"]] = family_sizes.get(panel["family"], 0) + 1
        columns = min(4, max(2, max(family_sizes.values())))
    lines = _layout(panels, columns)
    # Height follows the content: a panel line is as tall as its longest panel needs (0.24 in per
    # provider row, plus title and axis), so many panels stay readable instead of being squeezed.
    slots = [max(len(p["bars"]) + len(p["missing"]) for p in line) for line in lines]
    heights = [1.25 + 0.24 * count for count in slots]
    figure = Figure(figsize=((5.6 if columns <= 3 else 4.5) * columns, sum(heights) + 1.0), layout="constrained")
    grid = figure.add_gridspec(len(lines), columns, height_ratios=heights)
    colours: list[str] = []
    for line_index, line in enumerate(lines):
        for column, panel in enumerate(line):
            _draw_panel(figure.add_subplot(grid[line_index, column]), panel, colours, slots[line_index])
    speedup_panels = sum(bool(panel["baseline_ms"]) for panel in panels)
    if speedup_panels == len(panels):
        reading = "bars: speed-up over torch eager (linear axis from 0, dashed line = 1x)"
    elif speedup_panels == 0:
        reading = "bars: median time in ms (linear axis from 0)"
    else:
        reading = ("bars: speed-up over torch eager (linear axis from 0, dashed line = 1x), or median time in ms "
                   "(from 0) where a panel has no eager row")
    figure.suptitle(f"{title}\n{reading}; rows without a bar did not run", fontsize=10)
    return figure


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Save ``plot_figure(rows, title)`` as a PNG at ``path``.

    Returns
    -------
    str or None
        Why no plot was written, or None when it was.
    """
    try:
        figure = plot_figure(rows, title)
    except ImportError:
        return "matplotlib not installed: no plot"
    if figure is None:
        return "nothing timed: no plot"
    figure.savefig(path, dpi=110)
    return None


def plot_only(paths: list[str]) -> int:
    """Redraw the PNG beside each result JSON (``X.json`` -> ``X.png``) without running anything.

    Returns
    -------
    int
        The exit status: 1 when a plot could not be written.
    """
    status = 0
    for json_path in paths:
        with open(json_path) as handle:
            result = json.load(handle)
        png_path = os.path.splitext(json_path)[0] + ".png"
        title = plot_title(result.get("suite", "?"), result.get("environment", {}), result.get("complete", True))
        problem = plot(result["rows"], png_path, title)
        print(problem or f"wrote {os.path.relpath(png_path, os.getcwd())}")
        status |= problem is not None
    return status


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="default",
                        help="default: small shapes, about two minutes; full: the published shapes; "
                             "e2e: GRPO trainer step throughput; trl: TRL's GRPOTrainer update, patched vs not")
    parser.add_argument("--ops", default="", help="comma-separated ops to run (default: every bench/cases_*.py)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON and PNG")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--plot-only", nargs="+", metavar="JSON", default=None,
                        help="run nothing: redraw X.png beside each given result file X.json")
    return parser.parse_args(argv)


def write_json(path: str, suite: str, env: dict, limits: dict, rows: list[dict], complete: bool) -> None:
    """The result file; ``complete`` is False while the run is still going (or was stopped)."""
    with open(path + ".tmp", "w") as handle:
        json.dump({"suite": suite, "complete": complete, "environment": env, "limits": limits, "rows": rows},
                  handle, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        return plot_only(args.plot_only)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    print(f"# gtalign_fast bench: suite={args.suite} on {env['device']} (torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']})", flush=True)
    limits = measure_limits(device)
    print(f"# measured limits: copy {limits['bandwidth_GBps']:.1f} GB/s, "
          f"matmul {limits['matmul_TFLOPs']:.2f} TFLOP/s ({limits['matmul_dtype']})", flush=True)
    ops = {name.strip() for name in args.ops.split(",") if name.strip()} or None
    cases = collect_cases(device, args.suite, ops)
    try:
        from tqdm import tqdm

        progress = tqdm(cases, desc="bench", unit="case", file=sys.stderr)
    except ImportError:
        progress = cases
    os.makedirs(args.out, exist_ok=True)
    slug = device_slug(env["device"])
    stem = os.path.join(args.out, f"{slug}-{args.suite}{('-' + args.tag) if args.tag else ''}")
    rows = []
    for case in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(f"{case.op} {case.provider} {case.mode}")
        rows.append(run_case(case, device, limits))
        # Written after every row, so a run stopped part-way (a time limit) keeps what it measured.
        write_json(stem + ".json", args.suite, env, limits, rows, complete=False)
    add_speedups(rows)
    print(markdown_table(rows))
    write_json(stem + ".json", args.suite, env, limits, rows, complete=True)
    print(f"\nwrote {os.path.relpath(stem + '.json', os.getcwd())}")
    if not args.no_plot:
        problem = plot(rows, stem + ".png", plot_title(args.suite, env))
        print(problem or f"wrote {os.path.relpath(stem + '.png', os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
