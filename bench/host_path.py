"""The host path: each backend's per-step host time with the device work excluded (issue 14.5).

    PYTHONPATH=python python bench/host_path.py            # ~1 min
    PYTHONPATH=python python bench/host_path.py --reps 30  # steadier medians on a shared machine

Scenarios: fp32, 500 tensors of mixed sizes (harness.size_mix, 8M params) and 10,000 tensors of 1,000 elements.
Contenders, timed interleaved in one process (each repetition runs every contender once, from a rotating start):
  * triton host: FusedAdamW(backend="triton") on CPU tensors under TRITON_INTERPRET=1 with the Adam kernel's launch
    stubbed: everything a GPU step does on the host up to the launch (the check pass, the address rows' upload, the
    step counts, the scalars). "static grads" keeps the grads (zero_grad(set_to_none=False), a captured graph);
    "new grads" assigns a fresh set each step (set_to_none=True: the grad row moves and is uploaded), with the
    assignment loop timed alone and subtracted;
  * cpu check pass: fused_adam._C.Partition.addresses() over the same tensors, where the extension has it (the
    per-tensor pass the cpu backend's step runs before its data pass);
  * cpu step, 1-element tensors: the cpu backend's whole step over as many tensors of one element each (its host
    path with a trivial data pass); the same for torch fused, and torch fused's step on the real tensors (the
    reference point: what a step costs today, data included).
Each row: the median wall time and the median CPU time of this thread per step. Targets on the dev machine: triton
host (static and new grads) <= 30 us at 500 tensors and <= 0.6 ms at 10,000, judged on the thread's CPU time (on
the shared dev machine a wall time also counts the waits for a core).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the triton backend accepts CPU tensors

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import fused_adam  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

from fused_adam import FusedAdamW, backends  # noqa: E402

import harness  # noqa: E402

M = 1 << 20
TARGETS_US = {"500 mixed": 30.0, "10k x 1k": 600.0}


def _params(sizes: list[int], seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Params (each owning its memory) and two sets of grads for them."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).requires_grad_() for n in sizes]
    grads = [[torch.randn(n, generator=g) * 1e-2 for n in sizes] for _ in range(2)]
    return params, grads


def _assign(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def _stub_triton_launch() -> None:
    from fused_adam.backends import triton as tb

    tb._launch = lambda *args, **kwargs: None


def contenders(sizes: list[int]) -> dict[str, object]:
    """name -> callable timed per call (each with its own tensors)."""
    fns: dict[str, object] = {}
    if backends.unavailable("triton") is None:
        ps, grads = _params(sizes)
        _assign(ps, grads[0])
        opt = FusedAdamW(ps, backend="triton")
        opt.step()
        fns["triton host, static grads"] = opt.step
        ps, grads = _params(sizes, seed=1)  # tensors of its own: the static contender's grads stay put
        _assign(ps, grads[0])
        opt = FusedAdamW(ps, backend="triton")
        opt.step()
        flip = [0]

        def new_grads_step(ps=ps, grads=grads, opt=opt):
            flip[0] ^= 1
            _assign(ps, grads[flip[0]])
            opt.step()

        def assign_only(ps=ps, grads=grads):
            flip[0] ^= 1
            _assign(ps, grads[flip[0]])

        fns["triton host, new grads (+ assign)"] = new_grads_step
        fns["assign grads"] = assign_only
    if backends.unavailable("cpu") is None:
        from fused_adam import _C

        if hasattr(_C.Partition, "addresses"):
            ps, grads = _params(sizes)
            _assign(ps, grads[0])
            opt = FusedAdamW(ps, backend="cpu")
            opt.step()
            st = [opt.state[p] for p in ps]
            part = _C.Partition(ps, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [],
                                [s["step"] for s in st])
            out = torch.zeros(6, len(ps), dtype=torch.int64)
            fns["cpu check pass (addresses)"] = lambda: part.addresses(None, out)
        tiny, tiny_grads = _params([1] * len(sizes))
        _assign(tiny, tiny_grads[0])
        opt = FusedAdamW(tiny, backend="cpu")
        opt.step()
        fns["cpu step, 1-element tensors"] = opt.step
    tiny, tiny_grads = _params([1] * len(sizes))
    _assign(tiny, tiny_grads[0])
    opt = torch.optim.AdamW(tiny, fused=True)
    opt.step()
    fns["torch fused step, 1-element tensors"] = opt.step
    ps, grads = _params(sizes)
    _assign(ps, grads[0])
    opt = torch.optim.AdamW(ps, fused=True)
    opt.step()
    fns["torch fused step (data included)"] = opt.step
    return fns


def _timed(fn, inner: int) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) per call over `inner` calls. On a shared machine the wall time also
    counts the waits for a core; the thread's CPU time does not (the host path is one thread)."""
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    for _ in range(inner):
        fn()
    return (time.perf_counter_ns() - w0) / inner / 1e9, (time.thread_time_ns() - c0) / inner / 1e9


def run(sizes: list[int], reps: int, min_sample_s: float = 5e-3) -> dict[str, tuple[float, float]]:
    """Median (wall, thread CPU) seconds per call of each contender, interleaved."""
    fns = contenders(sizes)
    inner = {}
    for key, fn in fns.items():
        t = harness.cpu_timer(fn, 1, 1)
        inner[key] = max(1, int(min_sample_s / max(t, 1e-7)))
    names = list(fns)
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for rep in range(reps):
        for k in names[rep % len(names):] + names[:rep % len(names)]:
            samples[k].append(_timed(fns[k], inner[k]))
    if "assign grads" in samples:  # paired per repetition: the same drift on both
        samples["triton host, new grads"] = [
            (a[0] - b[0], a[1] - b[1]) for a, b in zip(samples["triton host, new grads (+ assign)"], samples["assign grads"])]
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    _stub_triton_launch()
    scenarios = {"500 mixed": harness.size_mix(8 * M, 500), "10k x 1k": [1000] * 10_000}
    from fused_adam.backends import triton as tb

    print(f"torch {torch.__version__}; triton check pass: {'native' if tb._NATIVE_ADDRESSES else 'Python stand-in'}; "
          f"{harness.load_average() or ''}")
    misses = 0
    for name, sizes in scenarios.items():
        med = run(sizes, args.reps)
        print(f"\n{name} ({len(sizes)} tensors, {sum(sizes) / M:.1f}M params)   median us per step: wall / thread CPU")
        for k, (wall, cpu) in med.items():
            print(f"  {k:<40} {wall * 1e6:10.1f} {cpu * 1e6:10.1f}")
        for k in ("triton host, static grads", "triton host, new grads"):
            if k in med:
                wall, cpu = med[k]
                ok = cpu * 1e6 <= TARGETS_US[name]
                misses += not ok
                print(f"  target: {k} <= {TARGETS_US[name]:.0f} us (thread CPU): {'pass' if ok else 'MISS'}"
                      f" ({cpu * 1e6:.1f} us; wall {wall * 1e6:.1f} us)")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
