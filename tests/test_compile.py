"""torch.compile: a compiled training step that calls opt.step() matches eager, and an LR scheduler changing lr
between steps does not recompile (see NOTE [torch.compile] in optimizer.py)."""
import copy

import pytest
import torch
import torch._dynamo

from fused_adam import FusedAdamW


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiled_train_step_matches_eager_without_recompiles(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters(), lr=0.05, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.05)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    @torch.compile(backend="eager")
    def train_step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    losses = []
    for i in range(6):
        if i == 2:
            torch._dynamo.config.error_on_recompile = True  # from here on, lr changes must not recompile
        try:
            losses.append(train_step(x, y).item())
        finally:
            torch._dynamo.config.error_on_recompile = False
        scheds[0].step()
        ref.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        ref.step()
        scheds[1].step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.05 * 0.5**3
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
