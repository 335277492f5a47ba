"""The GPU question: how fast is a whole AdamW optimizer.step() on CUDA tensors, against torch and the copy bandwidth?

    PYTHONPATH=python python bench/gpu_step.py            # on a machine with a CUDA device
    PYTHONPATH=python python bench/gpu_step.py --quick    # 16M instead of 64M params, fewer rounds

Contenders, timed interleaved by bench/harness.py (each round runs each contender once, in rotating order):
FusedAdamW backend="triton" and backend="cuda" (each where available), torch.optim.AdamW fused=True and
foreach=True, and the device-to-device copy (dst.copy_(src): 2 bytes moved per byte copied, buffers sized so a
copy moves as many bytes as the scenario's step). Each sample is triton.testing.do_bench's median (it flushes L2
between calls), or CUDA events without triton. GB/s use docs/design.md's cost model (28 B/param fp32, 14 B/param bf16
with bf16 states); "roofline" is the fraction of the copy's GB/s in the same round. Memory: peak growth of
torch.cuda.max_memory_allocated during one step. Results: bench/results/gpu_step[_quick].{json,csv,png}.

Without a CUDA device it says so and exits with status 0 (nothing to measure is not a failure of the project);
--dry-run runs the whole script on CPU tensors at tiny sizes, to check it where there is no GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import fused_adam  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import harness  # noqa: E402
from harness import BYTES_PER_PARAM, Contender, Scenario, size_mix  # noqa: E402

LR, WD = 1e-3, 1e-2
BASELINE = "torch fused"
M = 1 << 20


def make_timer():
    """(timer, name). timer(fn, inner, prime) -> seconds per call."""
    try:
        from triton.testing import do_bench

        def timer(fn, inner, prime):
            return do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e-3

        return timer, "triton.testing.do_bench median (L2 flushed between calls)"
    except Exception:
        def timer(fn, inner, prime):
            for _ in range(max(1, prime)):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3 / inner

        return timer, "CUDA events (triton not importable)"


def gpu_memory_probe(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return {"alloc_peak_bytes": max(0, torch.cuda.max_memory_allocated() - base), "rss_peak_bytes": None}


def build(name: str, sizes: list[int], dtype: torch.dtype, bpp_key: str, dev: torch.device) -> Scenario:
    from fused_adam import FusedAdamW, backends

    g = torch.Generator(device=dev).manual_seed(0)
    total = sum(sizes)
    flat_p = torch.randn(total, generator=g, device=dev).to(dtype)
    flat_g = (torch.randn(total, generator=g, device=dev) * 1e-2).to(dtype)
    base = [t.clone() for t in flat_p.split(sizes)]
    grads = [t.clone() for t in flat_g.split(sizes)]
    del flat_p, flat_g
    bpp = BYTES_PER_PARAM[bpp_key]

    def params():
        ps = [p.clone() for p in base]
        for p, gr in zip(ps, grads):
            p.grad = gr
        return ps

    def fused_adam_setup(backend):
        return lambda: FusedAdamW(params(), lr=LR, weight_decay=WD, backend=backend).step

    def torch_setup(**kw):
        return lambda: torch.optim.AdamW(params(), lr=LR, weight_decay=WD, **kw).step

    def copy_setup():
        n = max(1, total * bpp // 2)  # bytes per buffer: a copy reads one and writes the other
        src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    cs = [
        Contender("fused_adam triton", fused_adam_setup("triton"), skip=lambda: backends.unavailable("triton")),
        Contender("fused_adam cuda", fused_adam_setup("cuda"), skip=lambda: backends.unavailable("cuda")),
        Contender("torch foreach", torch_setup(foreach=True), kind="baseline"),
        Contender(BASELINE, torch_setup(fused=True), kind="baseline"),
        Contender("copy roofline", copy_setup, kind="roofline", note="dst.copy_(src), 2 B moved per B copied"),
    ]
    dt = str(dtype).removeprefix("torch.")
    return Scenario(name, total, len(sizes), dt, bpp, cs)


def profile(spec: tuple | None, dev: torch.device) -> int:
    """--profile: each contender's step 3 times after one untimed step (the states), in NVTX ranges."""
    if spec is None:
        print("gpu_step --profile: no scenario has that name")
        return 2
    scn = build(*spec, dev)
    for c in scn.contenders:
        if c.skip():
            continue
        step = c.setup()
        step()
        for _ in range(3):
            with torch.cuda.nvtx.range(c.name) if dev.type == "cuda" else contextlib.nullcontext():
                step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"  profiled {scn.name}: {c.name}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16M instead of 64M params, fewer rounds")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the script end to end on CPU tensors at tiny sizes (timings mean nothing)")
    ap.add_argument("--profile", metavar="SCENARIO",
                    help="time nothing: run each contender's step of the first scenario whose name has this "
                         "substring 3 times, each in an NVTX range named after the contender, for a profiler, "
                         "e.g. ncu --nvtx --nvtx-include 'fused_adam cuda/' --section MemoryWorkloadAnalysis")
    args = ap.parse_args(argv)

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend then runs on CPU tensors
        dev, timer, timer_name, probe = torch.device("cpu"), harness.cpu_timer, "dry run: CPU tensors, perf_counter", harness.cpu_memory_probe
    elif not torch.cuda.is_available():
        print(f"gpu_step: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
              "nothing to measure here. Run it on a GPU machine.")
        return 0
    else:
        dev, probe = torch.device("cuda"), gpu_memory_probe
        timer, timer_name = make_timer()

    t_start = time.perf_counter()
    meta = harness.machine_info()
    meta["timer"] = timer_name
    meta["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    print(f"{meta.get('gpu')} (sm_{meta.get('gpu_capability')}), torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {(meta['git_commit'] or '?')[:10]}; timer: {timer_name}")
    from fused_adam import backends

    for name in ("triton", "cuda"):
        print(f"  backend {name}: {backends.unavailable(name) or 'available'}")

    big = M if args.dry_run else 16 * M if args.quick else 64 * M
    n_mixed = 50 if args.dry_run else 500
    tag = f"{big // M}M"
    specs = [
        (f"fp32 1x{tag}", [big], torch.float32, "fp32"),
        (f"fp32 {n_mixed} mixed {tag}", size_mix(big, n_mixed), torch.float32, "fp32"),
        ("fp32 100 x 1k" if args.dry_run else "fp32 10k x 1k", [1000] * (100 if args.dry_run else 10_000), torch.float32, "fp32"),
        (f"bf16 {n_mixed} mixed {tag}", size_mix(big, n_mixed), torch.bfloat16, "bf16"),
    ]
    if args.profile:
        return profile(next((spec for spec in specs if args.profile in spec[0]), None), dev)
    if args.dry_run:
        # A dry run checks that every contender runs end to end: none is dropped for being slow (the interpreter on
        # a busy machine can take more than the harness's per-call cap).
        run_kw = dict(reps=(2, 3), warmup=1, budget_s=1.0, max_call_s=float("inf"))
    elif args.quick:
        run_kw = dict(reps=(3, 5), warmup=1, budget_s=2.0)
    else:
        run_kw = dict(reps=(5, 15), warmup=2, budget_s=10.0)
    rows = []
    for spec in specs:
        scn = build(*spec, dev)
        rows += harness.run_scenario(
            scn, baseline=BASELINE, timer=timer, memory_probe=probe, min_sample_s=0.0,
            progress=not args.no_progress, **run_kw,
        )
        del scn
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    wall = time.perf_counter() - t_start
    meta["wall_s"] = round(wall, 1)
    stem = "gpu_step_dry_run" if args.dry_run else "gpu_step_quick" if args.quick else "gpu_step"
    extra = {
        "bytes_model": dict(BYTES_PER_PARAM),
        "scenarios": [dict(name=s[0], numel=sum(s[1]), num_tensors=len(s[1]), dtype=str(s[2])) for s in specs],
    }
    paths = harness.write_results(rows, meta, args.out, stem, f"AdamW step on {meta.get('gpu')}, torch {meta['torch']}", extra)
    print()
    print(harness.format_table(rows))
    print()
    print("roofline: per-round GB/s / device-to-device copy GB/s; speedup: per-round time ratio vs torch fused;")
    print("alloc: peak growth of torch.cuda.max_memory_allocated during one step.")
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}  ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
