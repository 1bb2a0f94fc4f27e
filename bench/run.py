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

SUITES = ("default", "full", "e2e")


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
            reason = f"error building cases: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
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


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """One panel per (op, shape, dtype): time per provider and mode (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    timed = [r for r in rows if r["median_ms"]]
    groups = sorted({(r["op"], r["shape"], r["dtype"]) for r in timed})
    if not groups:
        return "nothing timed: no plot"
    columns = min(3, len(groups))
    lines = (len(groups) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(6 * columns, 3.8 * lines), squeeze=False)
    for axis, (op, shape, dtype) in zip(axes.flat, groups):
        group = [r for r in timed if (r["op"], r["shape"], r["dtype"]) == (op, shape, dtype)]
        providers = sorted({r["provider"] for r in group}, key=lambda p: (not p.startswith("gtalign"), p))
        modes = [m for m in ("fwd", "bwd", "full") if any(r["mode"] == m for r in group)]
        width = 0.8 / max(len(modes), 1)
        for index, mode in enumerate(modes):
            values = [next((r["median_ms"] for r in group if r["provider"] == p and r["mode"] == mode), 0)
                      for p in providers]
            axis.bar([i + index * width for i in range(len(providers))], values, width, label=mode)
        axis.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(providers))])
        axis.set_xticklabels(providers, rotation=30, ha="right", fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel("median ms (log)")
        axis.set_title(f"{op}  {shape}  {dtype}", fontsize=9)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="default",
                        help="default: small shapes, about two minutes; full: the published shapes; "
                             "e2e: GRPO trainer step throughput")
    parser.add_argument("--ops", default="", help="comma-separated ops to run (default: every bench/cases_*.py)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON and PNG")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return parser.parse_args(argv)


def write_json(path: str, suite: str, env: dict, limits: dict, rows: list[dict], complete: bool) -> None:
    """The result file; ``complete`` is False while the run is still going (or was stopped)."""
    with open(path + ".tmp", "w") as handle:
        json.dump({"suite": suite, "complete": complete, "environment": env, "limits": limits, "rows": rows},
                  handle, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = parse_args(argv)
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
        problem = plot(rows, stem + ".png", f"gtalign_fast {args.suite} on {env['device']} @ {env['commit']}")
        print(problem or f"wrote {os.path.relpath(stem + '.png', os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
