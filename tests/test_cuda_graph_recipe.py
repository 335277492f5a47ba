"""The README's CUDA-graph recipe, on every GPU backend: a capturable=True step with AMP's grad_scale/found_inf,
max_grad_norm and a Tensor lr changed by an LR scheduler, captured once and replayed 20 times, is bitwise the same
20 steps run eagerly. Needs a CUDA device (scripts/gpu_check.sh runs it on the GPU machine)."""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from fused_adam import FusedAdamW, backends
from parity import make_grads, make_params

STEPS = 20
SHAPES = [(1,), (7,), (3000,), (33, 5), (65537,)] + [(40,)] * 60
INF_AT = 7  # a step whose found_inf is set: it must change nothing, in the graph as eagerly


def _gpu_backends():
    if not torch.cuda.is_available():
        return ["cuda", "triton"]  # skipped below, with the reason
    return [b for b in ("cuda", "triton") if backends.unavailable(b) is None]


def _schedule(opt):
    # LambdaLR writes a Tensor lr in place (fill_), so the graph reads each step's value.
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.95 ** s)


@requires_cuda
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_captured_steps_are_the_eager_steps(backend, dtype):
    device = torch.device("cuda")
    params0 = make_params(dtype, SHAPES)
    grads = [[g.to(device, dtype) * 64 for g in make_grads(params0, s)] for s in range(STEPS + 1)]  # scaled by 64

    def fresh():
        params = [p.detach().clone().to(device).requires_grad_() for p in params0]
        opt = FusedAdamW(params, lr=torch.tensor(1e-3, device=device), capturable=True, amsgrad=True,
                         weight_decay=0.1, max_grad_norm=0.5, backend=backend,
                         **({"master_weights": True} if dtype == torch.bfloat16 else {}))
        return params, opt, _schedule(opt)

    grad_scale = torch.tensor(64.0, device=device)
    found_inf = torch.zeros((), device=device)

    eager_p, eager, eager_sched = fresh()
    for s in range(STEPS + 1):
        found_inf.fill_(1.0 if s == INF_AT else 0.0)
        for p, g in zip(eager_p, grads[s]):
            p.grad = g.clone()
        eager.step(grad_scale=grad_scale, found_inf=found_inf)
        eager_sched.step()

    params, opt, sched = fresh()
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static):
        p.grad = g  # static grads: the graph reads these addresses (zero_grad(set_to_none=False) keeps them)
    # Step 0 eagerly on a side stream (lazy state, the step plan, the device table), as torch's recipe warms up.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        found_inf.zero_()
        for g, new in zip(static, grads[0]):
            g.copy_(new)
        opt.step(grad_scale=grad_scale, found_inf=found_inf)
    torch.cuda.current_stream().wait_stream(side)
    sched.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(grad_scale=grad_scale, found_inf=found_inf)
    for s in range(1, STEPS + 1):
        found_inf.fill_(1.0 if s == INF_AT else 0.0)
        for g, new in zip(static, grads[s]):
            g.copy_(new)
        graph.replay()
        sched.step()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(params, eager_p)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"param {i}: {m}")
        for k, v in eager.state[b].items():
            torch.testing.assert_close(opt.state[a][k], v, rtol=0, atol=0, msg=lambda m: f"{k} of param {i}: {m}")
