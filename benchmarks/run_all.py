"""Run every benchmark in one go: patch reading, training, sampling, VAE reconstruction,
augmentation and rare-class modes, each against its reference measured in the same run, with
the peak memory of each benchmark's process (and the CPU model-FLOP utilisation the training
benchmark computes).

Each benchmark runs in its own fresh process (so its peak RSS is its own); the summary table of
all ratios is printed at the end and, with ``--append``, added to BENCHMARKS.md as a dated
section with the exact command and the machine (placed first: that file lists newest first).

    python benchmarks/run_all.py                          # full sizes (about 20 min on 2 CPU cores)
    python benchmarks/run_all.py --quick                  # small sizes: a smoke run (about 4 min)
    python benchmarks/run_all.py --append BENCHMARKS.md --json runs/bench_all.json
    python -m benchmarks --only tiling,training
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # `benchmarks.X` modules, and their `_data` helper
    if _p not in sys.path:
        sys.path.insert(0, _p)

# name -> (keyword arguments of its run() for the full run, for --quick)
BENCHMARKS: dict[str, tuple[dict, dict]] = {
    "tiling": ({}, {"repeats": 2}),
    "training": ({}, {"steps": 8, "batch_size": 16}),
    "sampling": ({}, {"n": 8, "batch_size": 8}),
    "vae_reconstruction": ({}, {"limit": 16}),
    "augment": ({}, {"steps": 8, "batch_size": 16}),
    "rare_classes": ({}, {"folds": 1, "n": 8, "modes": ("prior",)}),
}


def _child(name: str, kwargs: dict, conn, start_method: str | None = None) -> None:
    """Run one benchmark in this (fresh) process and send back its result and peak memory.

    ``start_method``: the parent's multiprocessing start method. A process started with
    ``spawn`` inherits ``spawn`` as its default, so without this a benchmark's DataLoader
    workers would be spawned (each importing torch afresh) where the same script run directly
    forks them on Linux."""
    import resource

    if start_method is not None:
        multiprocessing.set_start_method(start_method, force=True)
    t0 = time.perf_counter()
    try:
        result, error = importlib.import_module(f"benchmarks.{name}").run(**kwargs), None
    except Exception:  # reported in the table; the other benchmarks still run
        result, error = None, traceback.format_exc()
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    mem = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20,
           "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit / 2**20}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        mem["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    conn.send({"name": name, "kwargs": kwargs, "result": result, "error": error,
               "seconds": time.perf_counter() - t0, **mem})
    conn.close()


def run_benchmark(name: str, quick: bool = False, **overrides) -> dict:
    """Run benchmark ``name`` in a fresh process; returns ``{"name", "result", "error", "seconds",
    "peak_rss_mb", "children_peak_rss_mb"[, "cuda_peak_mb"]}``."""
    kwargs = {**BENCHMARKS[name][1 if quick else 0], **overrides}
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, kwargs, send, multiprocessing.get_start_method()))
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:  # the process died without reporting (killed, out of memory)
        out = {"name": name, "kwargs": kwargs, "result": None, "seconds": float("nan"),
               "error": f"benchmark process ended without a result (exit code {proc.join() or proc.exitcode})"}
    proc.join()
    return out


def machine() -> dict:
    """CPU model, cores, memory, torch version and GPU of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = float("nan")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gb": mem_gb,
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform(),
            "gpu": gpu, "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _num(v: float) -> str:
    return "n/a" if v is None or v != v else (f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}")


def summary_table(runs: list[dict]) -> str:
    """Markdown table: one row per measured ratio, peak memory per benchmark."""
    lines = ["| benchmark | measure | reference | reference value | synthgen | ratio | peak RSS MB (largest child) | time s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mem = f"{r.get('peak_rss_mb', float('nan')):.0f} ({r.get('children_peak_rss_mb', float('nan')):.0f})"
        if "cuda_peak_mb" in r:
            mem += f"; CUDA {r['cuda_peak_mb']:.0f}"
        if r["result"] is None:
            err = (r["error"] or "").strip().splitlines()[-1:] or ["failed"]
            lines.append(f"| {r['name']} | FAILED: {err[0].replace('|', '/')} | | | | | {mem} | {r['seconds']:.0f} | |")
            continue
        for i, row in enumerate(r["result"]["summary"]):
            lines.append("| " + " | ".join([
                r["name"] if i == 0 else "", row["measure"], row["reference"], _num(row["reference_value"]),
                _num(row["synthgen_value"]), f"**{row['ratio']:.2f}x**", mem if i == 0 else "",
                f"{r['seconds']:.0f}" if i == 0 else "", row.get("note", "")]) + " |")
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    gpu = m["gpu"] or "no GPU"
    load = m.get("load_average")
    return (f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable, torch uses {m['torch_threads']} threads), "
            f"{m['memory_gb']:.0f} GB RAM, {gpu}; torch {m['torch']}, Python {m['python']}"
            + (f"; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) at start" if load else ""))


def section(runs: list[dict], m: dict, command: str, date: str, quick: bool, busy_note: str = "") -> str:
    """A dated BENCHMARKS.md section: command, machine, table."""
    total = sum(r["seconds"] for r in runs if r["seconds"] == r["seconds"])
    text = [f"## All benchmarks (`benchmarks/run_all.py`{', --quick' if quick else ''}), {date}", "",
            f"Command: `{command}`", "", f"Machine: {machine_line(m)}.", ""]
    if busy_note:
        text += [busy_note, ""]
    text += [summary_table(runs), "",
             f"Each benchmark ran in its own process (total {total / 60:.1f} min); every ratio is synthgen "
             "over the reference measured in the same process, higher is better. Peak RSS is that "
             "process's high-water mark (in brackets: its largest child process, e.g. a DataLoader worker).", ""]
    return "\n".join(text)


def add_section(path: str | os.PathLike, text: str) -> None:
    """Insert ``text`` before the first ``## `` section of ``path`` (newest first), or append it."""
    from synthgen._io import atomic_write_text

    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    at = old.find("\n## ")
    new = old.rstrip("\n") + "\n\n" + text if at < 0 else old[: at + 1] + text + "\n" + old[at + 1 :]
    atomic_write_text(path, new)


def busy(load_start, load_end, cores: int) -> str:
    """A note when other work shared the CPU during the run (1-minute load above half the cores)."""
    loads = [v for v in (load_start, load_end) if v is not None]
    if loads and max(loads) > cores / 2:
        return (f"Note: the machine was shared while this ran (1-minute load average {load_start:.1f} at start, "
                f"{load_end:.1f} at the end, on {cores} cores). Rates are lower than on an idle machine, and since "
                "each reference and its synthgen counterpart run one after the other, load that changes between "
                "them moves the throughput ratios too: read them as noisy. Quality numbers (FD, PSNR, SSIM) "
                "do not depend on load.")
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run; numbers not comparable)")
    ap.add_argument("--only", default=None, metavar="A,B", help=f"run only these ({', '.join(BENCHMARKS)})")
    ap.add_argument("--append", type=Path, default=None, metavar="FILE",
                    help="add a dated section (command, machine, table) to FILE, e.g. BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")

    m = machine()
    command = " ".join(shlex.quote(a) for a in (getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]))
    date = datetime.date.today().isoformat()
    print(f"machine: {machine_line(m)}", flush=True)
    runs = []
    for name in names:
        print(f"running {name}{' (quick)' if args.quick else ''} ...", flush=True)
        r = run_benchmark(name, args.quick)
        runs.append(r)
        if r["error"]:
            print(r["error"], file=sys.stderr)
        else:
            for row in r["result"]["summary"]:
                print(f"  {row['measure']}: {row['ratio']:.2f}x vs {row['reference']}", flush=True)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    note = busy(m["load_average"][0] if m["load_average"] else None, load_end, m["usable_cores"])
    print()
    print(summary_table(runs))
    if note:
        print(note)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": date, "machine": m, "runs": runs}, indent=1,
                                        default=str))
    if args.append:
        add_section(args.append, section(runs, m, command, date, args.quick, note))
        print(f"section added to {args.append}")
    return 1 if any(r["error"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
