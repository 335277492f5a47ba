"""Parity with torch.optim.Adam/AdamW: every option x dtype x class, params and every state tensor, 20 steps."""
import pytest
import torch

from parity import (DTYPES, OPTIM_INPUTS, SHAPES, TENSOR_HYPER_INPUTS, assert_parity, assert_tensor_hyper_per_tensor_steps,
                    backends_here)


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
def test_reference_matches_torch(optim_input, dtype, cls_name):
    assert_parity("reference", cls_name, optim_input.kwargs, dtype)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("optim_input", TENSOR_HYPER_INPUTS, ids=repr)
def test_tensor_hyper_matches_torch(optim_input, dtype, cls_name, backend):
    """Tensor lr / betas: every backend's per-step scalars are torch's 0-dim tensor math (not double), 25 steps."""
    assert_parity(backend, cls_name, optim_input.kwargs, dtype, steps=25, shapes=SHAPES + ((1024,),))


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_hyper_per_tensor_steps(backend, dtype):
    """Tensor lr / betas with step counts that differ within a partition: each distinct count's scalars are torch's."""
    assert_tensor_hyper_per_tensor_steps(backend, dtype)
