"""FusedAdam next to torch.optim.Adam on two classic Adam tutorial examples: the main job's parity report.

Each example starts both optimizers from the same weights and feeds them the same data, so a correct FusedAdam
trains along the same loss curve. For each example the report prints:
  * the loss of both optimizers at the same steps,
  * how far apart the final params are, against the size of the params,
  * the median time of one optimizer step of each.
The linear regression's two loss curves are also saved as a PNG.

    python examples/tutorials.py [--backend auto] [--out bench/results]
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from fused_adam import FusedAdam

# Params may drift apart by this much of their scale (largest |value|) and still count as the same training run:
# torch's fp32 sqrt is not always correctly rounded where the kernels' is, and a last-bit difference in one step
# changes the next step's grads (tests/test_tutorials.py holds the examples to the same bound).
SAME_RUN_RTOL = 1e-3


def mlp_problem():
    """The 2-layer MLP of PyTorch's "Learning PyTorch with Examples": random data, sum-of-squares loss."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1000), torch.randn(64, 10)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    return model, x, y, torch.nn.MSELoss(reduction="sum"), dict(lr=1e-4), 500


def linear_regression_problem():
    """y = 3x + 1 + noise: 100 points, x uniform in [0, 2], noise sd 0.5."""
    torch.manual_seed(0)
    x = torch.rand(100, 1) * 2
    y = 3 * x + 1 + 0.5 * torch.randn(100, 1)
    return torch.nn.Linear(1, 1), x, y, torch.nn.MSELoss(), dict(lr=0.1), 100


def train(model, x, y, loss_fn, opt, steps):
    """`steps` full-batch steps; returns the loss before each step and the time of each opt.step()."""
    losses, step_times = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, step_times


def compare(name, problem, backend):
    model, x, y, loss_fn, kwargs, steps = problem()
    twin = copy.deepcopy(model)
    ours = FusedAdam(model.parameters(), backend=backend, **kwargs)
    theirs = torch.optim.Adam(twin.parameters(), **kwargs)
    our_losses, our_times = train(model, x, y, loss_fn, ours, steps)
    their_losses, their_times = train(twin, x, y, loss_fn, theirs, steps)

    ran = sorted({d.backend for group in ours.dispatch for d in group})
    max_diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    scale = max(b.abs().max().item() for b in twin.parameters())
    median_ms = lambda ts: sorted(ts)[len(ts) // 2] * 1e3  # noqa: E731
    ours_ms, theirs_ms = median_ms(our_times), median_ms(their_times)
    settings = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    print(f"\n== {name}")
    print(f"   {steps} steps, {settings}; FusedAdam(backend={backend!r}) ran on: {', '.join(ran)}")
    print(f"   {'step':>6}  {'FusedAdam loss':>15}  {'torch Adam loss':>15}")
    every = max(1, steps // 10)
    for s in list(range(0, steps, every)) + [steps - 1]:
        print(f"   {s:>6}  {our_losses[s]:>15.6g}  {their_losses[s]:>15.6g}")
    same = max_diff <= SAME_RUN_RTOL * scale
    verdict = "the same training run" if same else "NOT the same training run"
    print(f"   final params: max |difference| {max_diff:.3g} for params up to {scale:.3g} in size: {verdict}")
    print(f"   one optimizer step (median): FusedAdam {ours_ms:.3f} ms, torch Adam {theirs_ms:.3f} ms")
    return our_losses, their_losses, max_diff


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", help="FusedAdam's backend (default auto: the fastest that runs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "bench", "results"),
                        help="folder for the loss-curve PNG")
    args = parser.parse_args()
    print("FusedAdam vs torch.optim.Adam: same initial weights, same data, same hyperparameters.")
    print("A correct FusedAdam follows torch's loss curve; final params agree to within float rounding carried")
    print(f"through the run ({SAME_RUN_RTOL:g} of the params' size).")
    compare("2-layer MLP (Linear 1000 -> 100, ReLU, Linear 100 -> 10), random data, MSELoss(sum)", mlp_problem,
            args.backend)
    ours, theirs, _ = compare("linear regression: y = 3x + 1 + noise, 100 points, MSELoss", linear_regression_problem,
                              args.backend)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "linear_regression_loss.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(theirs, label="torch.optim.Adam", linewidth=3, alpha=0.5)
    ax.plot(ours, label=f"FusedAdam (backend={args.backend})", linestyle="--")
    ax.set(xlabel="step", ylabel="MSE loss", yscale="log", title="Linear regression, Adam lr=0.1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nlinear regression loss curves (both optimizers): {os.path.normpath(path)}")
    print("(The step times above are of small models and move with whatever else runs on the machine; the FusedAdam\n"
          " step is one multi-threaded pass, which waits when another process holds a core. bench/cpu_step.py\n"
          " measures speed.)")


if __name__ == "__main__":
    main()
