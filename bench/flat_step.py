"""Flat buffers on the CPU: how close does a flattened 10,000 x 1,000 fp32 AdamW step come to the roofline?

    PYTHONPATH=python python bench/flat_step.py            # ~1 min
    PYTHONPATH=python python bench/flat_step.py --quick    # fewer repetitions

Contenders, timed interleaved in one process (bench/harness.py), each a whole step over the same 10,000 params of
1,000 elements (grads assigned once):
  * "flat range + check": the step the plan runs for a flattened partition (fused_adam.flat, NOTE [flat buffers]):
    FlatRun.valid() (the per-step check: _C.SlotCheck where the extension is built, else Python), one cpu-backend
    call over the range, FlatRun.stepped();
  * "flat range": the same without the check: what a native check costing ~nothing leaves;
  * "FusedAdamW flattened": FusedAdamW over the flattened params, whatever path the optimizer takes today;
  * "fused_adam cpu" (drop-in, unflattened) and "torch fused" (the baseline);
  * "roofline": fused_adam._C.roofline_ over one fp32 buffer of 10M elements (Adam's access pattern, 28 B/param).
The flat buffers hold 1,008 elements per param (64-byte slots), so a flat step moves 0.8% more bytes than the
row's 28 B/param counts: the fraction of the roofline is the honest one. Then the per-step check alone is timed at
10,000 params, warm (right after itself) and cold (right after a 280 MB pass evicted what it reads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import fused_adam  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

from fused_adam import FusedAdamW, backends  # noqa: E402
from fused_adam.backends import Amp, Hyper, PartOptions  # noqa: E402
from fused_adam.flat import _native_slot_check, find_run, flatten_parameters  # noqa: E402
from fused_adam.plan import Partition  # noqa: E402
from fused_adam.state import Generation, StateDict, param_state  # noqa: E402

import harness  # noqa: E402
from harness import BYTES_PER_PARAM, ROOFLINE_BYTES_PER_ELEM, Contender, Scenario  # noqa: E402

LR, WD = 1e-3, 1e-2
N, SIZE = 10_000, 1_000
BASELINE = "torch fused"
GROUP = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, amsgrad=False, maximize=False, capturable=False,
             differentiable=False, decoupled_weight_decay=True)


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, SIZE, generator=g), torch.randn(N, SIZE, generator=g) * 1e-2


def leaf_params(p0: torch.Tensor, g0: torch.Tensor) -> list[torch.Tensor]:
    """N params of their own memory, each with its grad."""
    params = [p.clone().requires_grad_() for p in p0]
    for p, g in zip(params, g0):
        p.grad = g.clone()
    return params


class FlatStep:
    """One partition of flattened params stepped as the step plan steps a flat run (the wiring in flat.py's
    docstring): the run, its states and the two partitions built once; each step checks, then steps the range."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        flatten_parameters(params)
        opts = PartOptions.of(GROUP, torch.float32, False)
        self.state = StateDict(Generation())
        self.run = find_run(params, opts)
        views = self.run.states(self.state)
        sts = [param_state(self.state, p, opts, views[i]) for i, p in enumerate(params)]
        assert self.run.bind(sts)
        part = Partition(0, params[0].device, torch.float32, opts, None, params=params,
                         exp_avgs=[s["exp_avg"] for s in sts], exp_avg_sqs=[s["exp_avg_sq"] for s in sts],
                         max_exp_avg_sqs=[], state_steps=[s["step"] for s in sts], master_params=[],
                         tensor_ids=list(range(len(params))), view_pos=[])
        self.backend = backends.get("cpu")
        self.part = self.run.partition(part)
        self.backend.prepare(self.part)
        self.grads = [self.run.grad]
        self.hp = Hyper(LR, 0.9, 0.999, 1e-8, WD)

    def checked(self) -> None:
        if not self.run.valid():
            raise RuntimeError("flat_step: the run stopped being flat")
        self.unchecked()

    def unchecked(self) -> None:
        self.backend.step(self.part, self.grads, self.hp, Amp())
        self.run.stepped()


def contenders(p0: torch.Tensor, g0: torch.Tensor) -> list[Contender]:
    def flat(checked: bool):
        def setup():
            fs = FlatStep(leaf_params(p0, g0))
            return fs.checked if checked else fs.unchecked
        return setup

    def fused(flattened: bool):
        def setup():
            params = leaf_params(p0, g0)
            if flattened:
                flatten_parameters(params)
            return FusedAdamW(params, lr=LR, weight_decay=WD, backend="cpu").step
        return setup

    def torch_fused():
        return torch.optim.AdamW(leaf_params(p0, g0), lr=LR, weight_decay=WD, fused=True).step

    def roofline():
        from fused_adam import _C
        p, g, m, v = (torch.rand(N * SIZE) for _ in range(4))
        return lambda: _C.roofline_(p, g, m, v)

    cpu = lambda: backends.unavailable("cpu")  # noqa: E731
    return [
        Contender("flat range + check", flat(True), skip=cpu),
        Contender("flat range", flat(False), skip=cpu),
        Contender("FusedAdamW flattened", fused(True), skip=cpu),
        Contender("fused_adam cpu", fused(False), skip=cpu),
        Contender(BASELINE, torch_fused, kind="baseline"),
        Contender("roofline", roofline, kind="roofline", skip=cpu,
                  bytes_per_param=ROOFLINE_BYTES_PER_ELEM),
    ]


def time_check(p0: torch.Tensor, g0: torch.Tensor, reps: int) -> dict[str, float]:
    """FlatRun.valid() alone at N params, in ms: warm (right after itself) and cold (right after a pass over
    280 MB), each as wall time and as this thread's CPU time (which a busy machine's preemptions do not inflate)."""
    from fused_adam import _C

    fs = FlatStep(leaf_params(p0, g0))
    p, g, m, v = (torch.rand(N * SIZE) for _ in range(4))
    out: dict[str, list[float]] = {k: [] for k in ("warm_ms", "warm_cpu_ms", "cold_ms", "cold_cpu_ms")}

    def timed(prefix: str) -> None:
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        ok = fs.run.valid()
        c1, t1 = time.thread_time_ns(), time.perf_counter_ns()
        assert ok
        out[f"{prefix}_ms"].append((t1 - t0) / 1e6)
        out[f"{prefix}_cpu_ms"].append((c1 - c0) / 1e6)

    for _ in range(reps):
        fs.run.valid()
        timed("warm")
        _C.roofline_(p, g, m, v)
        timed("cold")
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = harness.machine_info()
    meta["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    print(f"{meta['cpu_model']}, {meta['cpu_count']} cores, torch {meta['torch']} ({meta['torch_threads']} threads; "
          f"fused_adam loops: {meta['fused_adam_cpu_isa']}), commit {(meta['git_commit'] or '?')[:10]}"
          f"{' (dirty)' if meta['git_dirty'] else ''}, load average {meta['loadavg']}")
    if backends.unavailable("cpu"):
        print(f"  cpu backend: {backends.unavailable('cpu')}")
        return 1
    p0, g0 = make_inputs()
    scn = Scenario("fp32 10k x 1k", N * SIZE, N, "float32", BYTES_PER_PARAM["fp32"], contenders(p0, g0),
                   description="10,000 tensors of 1,000 elements, flattened and not")
    run_kw = dict(reps=(8, 20), warmup=2, budget_s=4.0) if args.quick else dict(reps=(20, 60), warmup=3, budget_s=20.0)
    rows = harness.run_scenario(scn, baseline=BASELINE, progress=not args.no_progress, memory_probe=None, **run_kw)
    del scn
    check = time_check(p0, g0, 5 if args.quick else 20)
    paths = harness.write_results(rows, meta, args.out, "flat_step_quick" if args.quick else "flat_step",
                                  f"Flat buffers, 10k x 1k fp32 AdamW on {meta['cpu_model']}", {"check": check})
    print()
    print(harness.format_table(rows))
    print()
    where = "native _C.SlotCheck" if _native_slot_check() is not None else "Python"
    print(f"per-step check (FlatRun.valid, {where}) at {N} params: {check['warm_ms']:.3f} ms warm "
          f"({check['warm_cpu_ms']:.3f} ms of CPU), {check['cold_ms']:.3f} ms after a 280 MB pass "
          f"({check['cold_cpu_ms']:.3f} ms of CPU)")
    by = {r.contender: r for r in rows}
    r = by.get("flat range + check")
    if r is not None and r.roof_frac is not None:
        print(f"target: flattened >= 0.95 of the roofline: {r.roof_frac:.3f} with the {where} check, "
              f"{by['flat range'].roof_frac:.3f} without it "
              f"({'pass' if r.roof_frac >= 0.95 else 'miss'} with the check as it is today)")
    print(f"wrote {paths['json']}, {paths['csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
