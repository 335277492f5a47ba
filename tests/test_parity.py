"""Parity with torch.optim.Adam/AdamW: every option x dtype x class, params and every state tensor, 20 steps."""
import pytest

from parity import DTYPES, OPTIM_INPUTS, assert_parity


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
def test_reference_matches_torch(optim_input, dtype, cls_name):
    assert_parity("reference", cls_name, optim_input.kwargs, dtype)
