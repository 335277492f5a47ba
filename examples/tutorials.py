"""The main job's parity report: two classic Adam tutorial examples trained with FusedAdam and with
torch.optim.Adam side by side, on the default backend.

For each example it prints the losses of both optimizers at the same steps, the max |difference| of the final
params, and the mean time of one optimizer step; the linear regression also saves both loss curves as a PNG.

    python examples/tutorials.py [--backend auto] [--out bench/results]
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from fused_adam import FusedAdam


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
    median = lambda ts: sorted(ts)[len(ts) // 2] * 1e3  # noqa: E731
    print(f"\n== {name}: {steps} steps, {kwargs}, FusedAdam backend={backend} (ran: {', '.join(ran)})")
    print(f"{'step':>6} {'FusedAdam loss':>16} {'torch Adam loss':>16}")
    every = max(1, steps // 10)
    for s in list(range(0, steps, every)) + [steps - 1]:
        print(f"{s:>6} {our_losses[s]:>16.6g} {their_losses[s]:>16.6g}")
    print(f"max |param difference| after {steps} steps: {max_diff:.3g}")
    print(f"median step time: FusedAdam {median(our_times):.3f} ms, torch Adam {median(their_times):.3f} ms")
    return our_losses, their_losses, max_diff


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "bench", "results"))
    args = parser.parse_args()
    compare("2-layer MLP (1000 -> 100 -> 10), MSELoss(sum)", mlp_problem, args.backend)
    ours, theirs, _ = compare("linear regression y = 3x + 1 + noise", linear_regression_problem, args.backend)

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
    print(f"\nloss curves saved to {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
