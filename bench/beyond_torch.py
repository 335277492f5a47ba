"""The options beyond torch on the CPU: what does each storage mode cost per step, against torch fused and the roofline?

    PYTHONPATH=python python bench/beyond_torch.py --quick    # < 1 min: 8M params
    PYTHONPATH=python python bench/beyond_torch.py            # 32M params

One scenario, every contender timed interleaved in one process (bench/harness.py), a whole optimizer.step() per call
over the same tensor mix (200 tensors of mixed sizes): FusedAdamW backend="cpu" in each mode (bytes per param from
docs/design.md's cost model), torch.optim.AdamW(fused=True) with fp32 and with bf16 params, and the roofline kernel
fused_adam._C.roofline_ (one pass with Adam's access pattern over fp32: 28 B/param) on as many elements. A row's
"roofline" column is its GB/s (own bytes model) over the roofline's GB/s in the same repetition.
Targets (issue 6), printed as pass/miss with the measured ratio:
  * bf16 params and states with stochastic rounding: >= 2x the Gparam/s of torch fused with bf16 params;
  * fp32 params with bf16 states: >= 1.4x torch fused fp32;
  * master weights (bf16 params, fp32 master and states, 28 B/param): within 10% of the 28-byte roofline.
Results: bench/results/beyond_torch[_quick].{json,csv,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import fused_adam  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

from fused_adam import FusedAdamW, backends  # noqa: E402

import harness  # noqa: E402
from harness import ROOFLINE_BYTES_PER_ELEM, Contender, Scenario, size_mix  # noqa: E402

LR, WD = 1e-3, 1e-2
M = 1 << 20
BF16, F32 = torch.bfloat16, torch.float32

# name: (param dtype, FusedAdamW options, bytes per param). Bytes: read + write of every stored array
# (docs/design.md's cost model; the master mode writes the bf16 param copy too).
MODES: dict[str, tuple[torch.dtype, dict, int]] = {
    "ours fp32": (F32, {}, 28),
    "ours fp32 + bf16 states": (F32, dict(state_dtype=BF16), 20),
    "ours fp32 + bf16 states, SR": (F32, dict(state_dtype=BF16, stochastic_rounding=True), 20),
    "ours bf16": (BF16, {}, 14),
    "ours bf16, SR": (BF16, dict(stochastic_rounding=True), 14),
    "ours bf16 + fp32 states": (BF16, dict(state_dtype=F32), 22),
    "ours bf16 + fp32 master": (BF16, dict(master_weights=True, state_dtype=F32), 28),
    "ours bf16 + fp32 master + bf16 states, SR": (BF16, dict(master_weights=True, stochastic_rounding=True), 20),
}
TORCH_FP32, TORCH_BF16, ROOF = "torch fused fp32", "torch fused bf16", "roofline"


def make_tensors(sizes: list[int], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    flat_p = torch.randn(total, generator=g).to(dtype)
    flat_g = (torch.randn(total, generator=g) * 1e-2).to(dtype)
    return list(flat_p.split(sizes)), list(flat_g.split(sizes))


def contenders(sizes: list[int]) -> list[Contender]:
    inputs = {dt: make_tensors(sizes, dt) for dt in (F32, BF16)}

    def params(dtype):
        base, grads = inputs[dtype]
        ps = [p.clone() for p in base]
        for p, g in zip(ps, grads):
            p.grad = g  # grads are only read (no grad_scale): shared by the contenders
        return ps

    def ours(dtype, options):
        return lambda: FusedAdamW(params(dtype), lr=LR, weight_decay=WD, backend="cpu", **options).step

    def torch_fused(dtype):
        return lambda: torch.optim.AdamW(params(dtype), lr=LR, weight_decay=WD, fused=True).step

    def roofline():
        from fused_adam import _C

        n = sum(sizes)
        p, g, m, v = (torch.rand(n) for _ in range(4))
        return lambda: _C.roofline_(p, g, m, v)

    cpu_reason = lambda: backends.unavailable("cpu")  # noqa: E731
    out = [
        Contender(name, ours(dtype, options), skip=cpu_reason, bytes_per_param=bpp)
        for name, (dtype, options, bpp) in MODES.items()
    ]
    out += [
        Contender(TORCH_FP32, torch_fused(F32), kind="baseline", bytes_per_param=28),
        Contender(TORCH_BF16, torch_fused(BF16), kind="baseline", bytes_per_param=14),
        Contender(ROOF, roofline, kind="roofline", skip=cpu_reason, bytes_per_param=ROOFLINE_BYTES_PER_ELEM),
    ]
    return out


class RecordingTimer:
    """harness.cpu_timer that keeps every sample per contender, so that each target is a median of per-repetition
    ratios (both sides timed in the same round), as the harness does against its one baseline: drift cancels."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.samples: dict[int, list[float]] = {}

    def __call__(self, fn: Callable, inner: int, prime: int) -> float:
        t = harness.cpu_timer(fn, inner, prime)
        self.samples.setdefault(id(fn), []).append(t)
        return t

    def timed(self, fn: Callable) -> list[float]:
        return self.samples.get(id(fn), [])[self.warmup:]


def check_targets(rows: list[harness.Row], samples: dict[str, list[float]]) -> list[dict]:
    by = {r.contender: r for r in rows if r.status == "ok"}

    def paired(a: str, b: str, a_over_b: Callable[[float, float], float]) -> float | None:
        if a not in by or b not in by or not samples.get(a) or len(samples[a]) != len(samples.get(b, ())):
            return None
        return harness._quantile([a_over_b(x, y) for x, y in zip(samples[a], samples[b])], 0.5)

    speed = lambda x, y: y / x  # noqa: E731  same numel: Gparam/s ratio = time ratio
    master = "ours bf16 + fp32 master"
    targets = [
        ("bf16 + SR vs torch fused bf16 (Gparam/s)", paired("ours bf16, SR", TORCH_BF16, speed), 2.0),
        ("fp32 + bf16 states vs torch fused fp32 (Gparam/s)", paired("ours fp32 + bf16 states", TORCH_FP32, speed), 1.4),
        # same bytes per param as the roofline kernel (28) and the same numel: GB/s ratio = time ratio
        ("master weights, fraction of the 28 B/param roofline", paired(master, ROOF, speed), 0.9),
    ]
    return [
        dict(target=name, value=value, threshold=threshold,
             status="n/a" if value is None else ("pass" if value >= threshold else "miss"))
        for name, value, threshold in targets
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8M instead of 32M params, fewer reps: < 1 min on 2 cores")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed repetitions")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds for other processes to use < 10%% of the CPU")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    numel = 8 * M if args.quick else 32 * M
    sizes = size_mix(numel, 200)
    meta = harness.machine_info()
    print(f"{meta['cpu_model']}, {meta['cpu_count']} cores, torch {meta['torch']} ({meta['torch_threads']} threads), "
          f"load average {meta['loadavg']}")
    t0 = time.time()
    cs = contenders(sizes)
    fns: dict[str, Callable] = {}
    for c in cs:  # keep each contender's timed callable, to find its samples in the recording timer
        setup = c.setup
        c.setup = lambda setup=setup, name=c.name: fns.setdefault(name, setup())
    scn = Scenario(f"{numel // M}M params, 200 tensors", numel, len(sizes), "mixed", 28, cs,
                   description="each mode of the cpu backend vs torch fused and the roofline, interleaved")
    if args.wait_quiet > 0:
        share = harness.wait_for_quiet(args.wait_quiet)
        if share is not None and share >= 0.1:
            print(f"other processes still use {100 * share:.0f}% of the CPU; timing anyway", file=sys.stderr)
    timer = RecordingTimer(warmup=2)
    rows = harness.run_scenario(
        scn, reps=(5, 15) if args.quick else (10, 40), warmup=2, budget_s=args.budget or (20.0 if args.quick else 60.0),
        baseline=TORCH_BF16, timer=timer, memory_probe=None, progress=not args.no_progress,
    )
    targets = check_targets(rows, {name: timer.timed(fn) for name, fn in fns.items()})
    meta["loadavg_end"] = harness.load_average()
    stem = "beyond_torch_quick" if args.quick else "beyond_torch"
    paths = harness.write_results(rows, meta, args.out, stem, "CPU AdamW step: options beyond torch", {"targets": targets})

    print()
    print(harness.format_table(rows))
    print()
    print("bytes/param per mode: " + ", ".join(f"{n.removeprefix('ours ')} {b}" for n, (_, _, b) in MODES.items()))
    print(f"roofline: median of per-rep (GB/s / roofline GB/s at 28 B/param); speedup: per-rep time ratio vs {TORCH_BF16}")
    print()
    print("targets (medians of per-repetition ratios):")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['status']:<4}  {t['target']}: {value} (target >= {t['threshold']})")
    print()
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}  ({time.time() - t0:.0f} s; load average at the end "
          f"{meta['loadavg_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
