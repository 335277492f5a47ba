"""The benchmark harness: interleaved timing, bytes model, roofline fraction, memory probes, and the result files.

Every script in bench/ asks one question with it (cpu_step.py, gpu_step.py). What it guarantees:
  * contenders of a scenario are timed round-robin in one process: each repetition runs every contender once,
    starting at a rotating position, so bandwidth drift (up to 1.6x between runs minutes apart on the dev
    machine, see bench/NOTES.md) hits all of them alike;
  * each row reports the median per-call time and its p10/p90, Gparam/s, and GB/s from an explicit bytes model
    (bytes moved per parameter per step, docs/design.md's cost model);
  * the roofline kernel is one of the contenders; a row's fraction of it and its speedup over the baseline are
    medians of per-repetition ratios (both timed in the same repetition), which cancels the drift;
  * peak memory growth during one step is measured at the malloc level, twice: torch's allocator (profiler
    allocation events, a running sum) and the process's peak RSS (VmHWM after resetting it via clear_refs);
  * results go to JSON (machine, versions, commit, date, every row) and CSV, a printed table and a PNG plot.
"""
from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

GiB = 1 << 30
MiB = 1 << 20

# docs/design.md's cost model: bytes read + written per parameter in one fused step.
BYTES_PER_PARAM = {
    "fp32": 28,  # read p g m v (16), write p m v (12)
    "fp32_amsgrad": 36,  # + read and write vmax
    "fp32_bf16_states": 20,
    "bf16": 14,  # bf16 params, grads and states (torch's layout: states take the param dtype)
    "bf16_fp32_states": 22,
    "bf16_fp32_master": 28,
}
ROOFLINE_BYTES_PER_ELEM = 28  # the roofline kernel: Adam's access pattern over fp32 (read 4 arrays, write 3)


# ---- what is timed ---------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One thing timed in a scenario.

    setup() allocates its tensors and returns the callable that is timed (one optimizer step); it runs once per
    scenario, so whatever it holds is freed when the scenario ends. skip() says why the contender cannot run in
    this process (None: it can). numel/bytes_per_param default to the scenario's; the roofline contender sets its
    own (its fp32 buffers hold as many bytes as the scenario moves)."""

    name: str
    setup: Callable[[], Callable[[], Any]]
    kind: str = "ours"  # "ours" | "baseline" | "roofline"
    skip: Callable[[], str | None] = lambda: None
    numel: int | None = None
    bytes_per_param: float | None = None
    note: str = ""


@dataclass
class Scenario:
    name: str
    numel: int  # parameters updated per step
    num_tensors: int
    dtype: str
    bytes_per_param: float
    contenders: list[Contender]
    prime: int = 0  # untimed calls before each timed sample (1 for cache-resident scenarios)
    description: str = ""


@dataclass
class Row:
    scenario: str
    contender: str
    kind: str
    status: str  # "ok" | "skipped" | "error"
    reason: str = ""
    numel: int = 0
    num_tensors: int = 0
    dtype: str = ""
    bytes_per_param: float = 0.0
    reps: int = 0
    inner: int = 0
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    gparam_s: float | None = None
    gb_s: float | None = None
    gb_s_p10: float | None = None  # from the p90 time
    gb_s_p90: float | None = None  # from the p10 time
    roof_frac: float | None = None  # median over repetitions of (this GB/s) / (roofline GB/s, same repetition)
    roof_frac_p10: float | None = None
    roof_frac_p90: float | None = None
    speedup: float | None = None  # median over repetitions of baseline time / this time (per param)
    speedup_vs: str = ""
    alloc_peak_bytes: int | None = None  # torch allocator: peak of (allocated - freed) during one step
    rss_peak_bytes: int | None = None  # process: peak RSS during one step - RSS before it
    others_cpu: float | None = None  # share of the machine's CPU time other processes used while this scenario ran
    note: str = ""


# ---- inputs ----------------------------------------------------------------------------------------------------


def size_mix(total: int, n: int, seed: int = 0) -> list[int]:
    """n tensor sizes summing to total, the same on every run: a fifth are small vectors (64..8192 elements,
    odd sizes included, like biases and norms), the rest matrices whose sizes span a 64x range (log-uniform)."""
    if not 1 <= n <= total // 8192:
        raise ValueError(f"size_mix: need 1 <= n <= total / 8192, got n={n}, total={total}")
    rng = random.Random(seed)
    n_small = n // 5
    small = [int(64 * 128 ** rng.random()) for _ in range(n_small)]
    weights = [64 ** rng.random() for _ in range(n - n_small)]
    rest = total - sum(small)
    wsum = sum(weights)
    large = [max(1, int(rest * w / wsum)) for w in weights]
    large[large.index(max(large))] += rest - sum(large)
    sizes = small + large
    rng.shuffle(sizes)
    return sizes


# ---- timers and memory probes ----------------------------------------------------------------------------------


def cpu_timer(fn: Callable[[], Any], inner: int, prime: int) -> float:
    """Seconds per call: `prime` untimed calls, then `inner` timed back to back."""
    for _ in range(prime):
        fn()
    t0 = time.perf_counter_ns()
    for _ in range(inner):
        fn()
    return (time.perf_counter_ns() - t0) / inner / 1e9


_libc = None


def _malloc_trim() -> None:
    """Return freed heap memory to the OS, so that memory a step allocates shows up as new RSS."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def rss_peak_growth(fn: Callable[[], Any]) -> int | None:
    """Peak RSS during fn() minus RSS before it. Writing 5 to /proc/self/clear_refs resets VmHWM to the current
    RSS (Linux >= 4.0); None where that is not possible."""
    try:
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status()["VmRSS"]
        fn()
        return max(0, _proc_status()["VmHWM"] - before)
    except OSError:
        return None


class _quiet_stderr:
    """The profiler prints start/stop lines on fd 2; hide them while it runs."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def torch_alloc_peak(fn: Callable[[], Any]) -> int | None:
    """Peak of torch's live allocations made during fn(), from the profiler's allocation events (every
    alloc/free through c10's allocator, any thread). Allocations outside torch's allocator are not seen: the
    RSS probe covers those."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
        live = peak = 0
        for _, size in sorted(events):
            live += size
            peak = max(peak, live)
        return peak
    except Exception:  # private profiler API: a missing piece means "not measured", not a failed run
        return None


def _cpu_snapshot() -> tuple[int, int, int] | None:
    """(busy, total) jiffies of the whole machine and this process's own jiffies."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(fields[:8]) - idle, sum(fields[:8]), int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


def others_cpu_share(start, end) -> float | None:
    """Fraction of the machine's CPU time used by other processes between two _cpu_snapshot()s: where it is
    high, timings carry their contention (OpenMP regions then wait for a time slice: many-tensor paths suffer)."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[2] - start[2])) / (end[1] - start[1]))


def wait_for_quiet(max_wait_s: float, threshold: float = 0.1, window_s: float = 2.0) -> float | None:
    """Sleep until other processes use under `threshold` of the machine's CPU over a window_s window, or until
    max_wait_s has passed. Returns the last window's share (None where /proc/stat cannot be read)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        a = _cpu_snapshot()
        time.sleep(window_s)
        share = others_cpu_share(a, _cpu_snapshot())
        if share is None or share < threshold or time.monotonic() >= deadline:
            return share


def cpu_memory_probe(fn: Callable[[], Any]) -> dict[str, int | None]:
    return {"rss_peak_bytes": rss_peak_growth(fn), "alloc_peak_bytes": torch_alloc_peak(fn)}


# ---- the run ---------------------------------------------------------------------------------------------------


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def run_scenario(
    scn: Scenario,
    *,
    reps: tuple[int, int] = (10, 50),
    warmup: int = 2,
    budget_s: float = 10.0,
    min_sample_s: float = 2e-3,
    max_call_s: float = 30.0,
    baseline: str | None = None,
    timer: Callable[[Callable[[], Any], int, int], float] = cpu_timer,
    memory_probe: Callable[[Callable[[], Any]], dict[str, int | None]] | None = cpu_memory_probe,
    progress: bool = True,
) -> list[Row]:
    """Time every contender of `scn` interleaved and return one row each.

    reps=(min, max): repetitions are as many as fit in budget_s (estimated from the warmup), within [min, max].
    Each contender's sample is `inner` back-to-back calls, inner chosen so a sample lasts >= min_sample_s.
    A contender whose warmup call takes over max_call_s is dropped with that reason (on a shared machine, torch's
    one-OpenMP-region-per-tensor paths can wait a scheduler slice per tensor: minutes per step at 10k tensors).
    """
    rows: dict[str, Row] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for c in scn.contenders:
        rows[c.name] = Row(
            scn.name, c.name, c.kind, "ok", numel=c.numel or scn.numel, num_tensors=scn.num_tensors,
            dtype=scn.dtype, bytes_per_param=c.bytes_per_param or scn.bytes_per_param, note=c.note,
        )
        reason = c.skip()
        if reason is not None:
            rows[c.name].status, rows[c.name].reason = "skipped", reason
            continue
        try:
            fns[c.name] = c.setup()
        except Exception as e:
            rows[c.name].status, rows[c.name].reason = "error", f"setup: {_reason(e)}"

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=warmup, desc=f"{scn.name:<22}", unit="rep", leave=True, file=sys.stderr, dynamic_ncols=True)

    # Warmup: the first call creates optimizer state; later ones estimate the per-call time.
    est: dict[str, float] = {}
    snap0 = _cpu_snapshot()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            for name in list(fns):
                try:
                    est[name] = timer(fns[name], 1, scn.prime)
                except Exception as e:
                    rows[name].status, rows[name].reason = "error", f"step: {_reason(e)}"
                    del fns[name]
                    continue
                if est[name] > max_call_s:
                    rows[name].status = "skipped"
                    rows[name].reason = f"one step took {est[name]:.1f} s > {max_call_s:g} s (others_cpu shows contention)"
                    del fns[name]
            if bar:
                bar.update(1)

        names = list(fns)
        inner = {n: max(1, math.ceil(min_sample_s / max(est.get(n, min_sample_s), 1e-9))) for n in names}
        round_s = sum(est.get(n, 0.0) * (inner[n] + scn.prime) for n in names)
        n_reps = int(min(reps[1], max(reps[0], budget_s // max(round_s, 1e-9))))
        if bar:
            bar.total = warmup + n_reps
            bar.refresh()

        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(n_reps):
            k = r % len(names) if names else 0
            for name in names[k:] + names[:k]:
                try:
                    samples[name].append(timer(fns[name], inner[name], scn.prime))
                except Exception as e:
                    if rows[name].status == "ok":
                        rows[name].status, rows[name].reason = "error", f"step: {_reason(e)}"
            if bar:
                bar.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
        if bar:
            bar.close()

    others = others_cpu_share(snap0, _cpu_snapshot())
    for row in rows.values():
        row.others_cpu = others
    ok = [n for n in names if rows[n].status == "ok"]
    for name in ok:
        row, t = rows[name], samples[name]
        row.reps, row.inner = len(t), inner[name]
        row.median_ms, row.p10_ms, row.p90_ms = (_quantile(t, q) * 1e3 for q in (0.5, 0.1, 0.9))
        nbytes = row.numel * row.bytes_per_param
        row.gparam_s = row.numel / (row.median_ms * 1e-3) / 1e9
        row.gb_s = nbytes / (row.median_ms * 1e-3) / 1e9
        row.gb_s_p10 = nbytes / (row.p90_ms * 1e-3) / 1e9
        row.gb_s_p90 = nbytes / (row.p10_ms * 1e-3) / 1e9

    # Paired ratios: each repetition's sample of a contender against the same repetition's roofline/baseline.
    roof = next((n for n in ok if rows[n].kind == "roofline"), None)
    for name in ok:
        row = rows[name]
        if roof is not None:
            rr = rows[roof]
            fr = [
                (row.numel * row.bytes_per_param / a) / (rr.numel * rr.bytes_per_param / b)
                for a, b in zip(samples[name], samples[roof])
            ]
            row.roof_frac, row.roof_frac_p10, row.roof_frac_p90 = (_quantile(fr, q) for q in (0.5, 0.1, 0.9))
        if baseline in ok and rows[name].kind != "roofline":
            rb = rows[baseline]
            sp = [(b / rb.numel) / (a / row.numel) for a, b in zip(samples[name], samples[baseline])]
            row.speedup, row.speedup_vs = statistics.median(sp), baseline

    if memory_probe is not None:
        for name in ok:
            try:
                for key, value in memory_probe(fns[name]).items():
                    setattr(rows[name], key, value)
            except Exception as e:
                rows[name].note = (rows[name].note + f" memory probe failed: {_reason(e)}").strip()

    fns.clear()
    gc.collect()
    _malloc_trim()
    return list(rows.values())


# ---- machine and versions --------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def load_average() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def _fused_adam_isa() -> str | None:
    """The instruction set fused_adam's CPU loops run with here (None without the native build)."""
    try:
        from fused_adam import _C
    except Exception:
        return None
    return _C.cpu_isa()


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None

    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fused_adam_cpu_isa": _fused_adam_isa(),
        "mem_total_bytes": mem_total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "deepspeed": _version("deepspeed"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "cuda": torch.version.cuda,
        "loadavg": load_average(),  # other processes on the machine: their load shows up as spread
    }
    try:
        import fused_adam
        from fused_adam import backends

        info["fused_adam"] = fused_adam.__version__
        info["backends"] = {n: backends.unavailable(n) or "available" for n in backends.BACKEND_NAMES}
    except Exception as e:
        info["fused_adam"] = f"import failed: {_reason(e)}"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


# ---- output ----------------------------------------------------------------------------------------------------


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def _mib(x):
    return "-" if x is None else f"{x / MiB:.1f}"


def format_table(rows: list[Row]) -> str:
    head = ("scenario", "contender", "ms median [p10, p90]", "Gparam/s", "GB/s", "roofline", "speedup", "alloc MiB", "RSS MiB", "others")
    lines = []
    for r in rows:
        if r.status != "ok":
            lines.append((r.scenario, r.contender, f"{r.status}: {r.reason}", "", "", "", "", "", "", ""))
            continue
        lines.append((
            r.scenario,
            r.contender,
            f"{r.median_ms:.3f} [{r.p10_ms:.3f}, {r.p90_ms:.3f}]",
            _fmt(r.gparam_s, ".3f"),
            _fmt(r.gb_s, ".1f"),
            "-" if r.roof_frac is None else f"{r.roof_frac:.2f} [{r.roof_frac_p10:.2f}, {r.roof_frac_p90:.2f}]",
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
            _mib(r.alloc_peak_bytes),
            _mib(r.rss_peak_bytes),
            "-" if r.others_cpu is None else f"{100 * r.others_cpu:.0f}%",
        ))
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if not l[2].startswith(("skipped", "error")) or i < 2)) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    prev = None
    for l in lines:
        if prev is not None and l[0] != prev:
            out.append("")
        prev = l[0]
        if l[2].startswith(("skipped", "error")):
            out.append("  ".join((l[0].ljust(widths[0]), l[1].ljust(widths[1]), l[2])))
        else:
            out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
    return "\n".join(out)


def plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    contenders = list(dict.fromkeys(r.contender for r in ok))
    if not ok:
        return
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(10, 1.9 * len(scenarios)), 9), sharex=True)
    width = 0.8 / max(1, len(contenders))
    cmap = plt.get_cmap("tab10")
    for ci, c in enumerate(contenders):
        xs, ys, lo, hi, fx, fy, flo, fhi = [], [], [], [], [], [], [], []
        for si, s in enumerate(scenarios):
            r = next((r for r in ok if r.scenario == s and r.contender == c), None)
            if r is None:
                continue
            x = si + (ci - (len(contenders) - 1) / 2) * width
            xs.append(x)
            ys.append(r.gparam_s)
            lo.append(r.gparam_s - r.numel / (r.p90_ms * 1e-3) / 1e9)
            hi.append(r.numel / (r.p10_ms * 1e-3) / 1e9 - r.gparam_s)
            if r.roof_frac is not None and r.kind != "roofline":
                fx.append(x)
                fy.append(r.roof_frac)
                flo.append(r.roof_frac - r.roof_frac_p10)
                fhi.append(r.roof_frac_p90 - r.roof_frac)
        color = "black" if any(r.kind == "roofline" for r in ok if r.contender == c) else cmap(ci % 10)
        ax.bar(xs, ys, width, yerr=[lo, hi], label=c, color=color, capsize=2)
        if fx:
            ax2.bar(fx, fy, width, yerr=[flo, fhi], label=c, color=color, capsize=2)
    ax.set_yscale("log")
    ax.set_ylabel("Gparam/s (median, p10-p90)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=4)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax2.axhline(1.0, color="black", lw=0.8)
    fracs = [r.roof_frac for r in ok if r.roof_frac is not None and r.kind != "roofline"]
    if fracs:  # a contention spike's p90 would otherwise set the scale
        ax2.set_ylim(0, max(1.2, min(3.0, 1.15 * max(fracs))))
    ax2.set_ylabel("fraction of roofline GB/s\n(same run, paired per rep)")
    ax2.grid(axis="y", alpha=0.3)
    ax2.set_xticks(range(len(scenarios)))
    ax2.set_xticklabels(scenarios, rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(rows: list[Row], meta: dict[str, Any], out_dir: str, stem: str, title: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Writes {stem}.json, {stem}.csv and {stem}.png under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "csv", "png")}
    with open(paths["json"], "w") as f:
        json.dump({"machine": meta, **(extra or {}), "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else [])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    plot(rows, paths["png"], title)
    return paths
