"""Run PyTorch's own optimizer tests (test/test_optim.py, the OptimizerInfo version) with FusedAdam/FusedAdamW in place
of torch.optim.Adam/AdamW.

    python scripts/torch_optim_suite.py PATH/TO/test_optim.py [--impl fused_adam|torch] [--backend auto|cpu|...]
                                        [-- extra pytest arguments]

test_optim.py is not part of this repository (nor of the torch wheel): take it from the pytorch repository at the tag
of the installed torch. Its helpers (torch.testing._internal.common_optimizers) ship with torch. The script:
  * replaces the optim_cls of the Adam and AdamW entries of optim_db with subclasses of FusedAdam/FusedAdamW named
    Adam and AdamW (the tests compare optim_cls.__name__ and name their cases after it), bound to --backend;
  * stubs the test/optim/ modules test_optim.py imports (their tests are not optimizer-generic);
  * runs pytest on the file in this process, selecting the Adam and AdamW cases (-k "_Adam_ or _AdamW_").
--impl torch runs the same selection on torch's own classes: the baseline. A -k of your own after -- replaces the
selection: narrow it as -k "NAME and (_Adam_ or _AdamW_)".

What to expect (torch 2.13, its test_optim.py): every Adam/AdamW case that passes with torch's classes passes with
backend="auto" and "reference"; with an explicit "cpu" or "triton", test_step_is_noop_for_zero_grads fails by design
(it tries differentiable=True, which only the reference backend runs, and an explicit backend raises rather than
fall back). Older test files may add failures torch's own classes share (test_complex with fused=True).
"""
from __future__ import annotations

import argparse
import os
import sys
import types


def _stub_test_modules() -> None:
    """test_optim.py imports test classes from test/optim/; they test schedulers and SWA, not the optimizers."""
    package = types.ModuleType("optim")
    package.__path__ = []
    sys.modules["optim"] = package
    # (Older versions of test_optim.py also import TestOptim from test/optim/test_optim.py.)
    for module, names in (("test_lrscheduler", ["TestLRScheduler"]),
                          ("test_optim", ["TestDifferentiableOptimizer", "TestOptim"]),
                          ("test_swa_utils", ["TestSWAUtils"])):
        stub = types.ModuleType(f"optim.{module}")
        for name in names:
            setattr(stub, name, type(name, (), {}))
        sys.modules[f"optim.{module}"] = stub


def _swap_in(backend: str) -> None:
    import torch
    from torch.testing._internal import common_optimizers

    from fused_adam import FusedAdam, FusedAdamW

    def bound(base: type, name: str) -> type:
        def __init__(self, params, *args, **kwargs):
            kwargs.setdefault("backend", backend)
            base.__init__(self, params, *args, **kwargs)

        return type(name, (base,), {"__init__": __init__, "__module__": __name__})

    swaps = {torch.optim.Adam: bound(FusedAdam, "Adam"), torch.optim.AdamW: bound(FusedAdamW, "AdamW")}
    for info in common_optimizers.optim_db:
        if info.optim_cls in swaps:
            info.optim_cls = swaps[info.optim_cls]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_file", help="path to pytorch's test/test_optim.py")
    parser.add_argument("--impl", choices=("fused_adam", "torch"), default="fused_adam")
    parser.add_argument("--backend", default="auto", help="FusedAdam's backend (default: auto)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after "--" goes to pytest as it is (argparse would not take options after the positional).
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.pytest_args += argv[cut + 1:]
    path = os.path.abspath(args.test_file)
    if not os.path.isfile(path):
        parser.error(f"no file {path}")

    import pytest

    _stub_test_modules()
    if args.impl == "fused_adam":
        _swap_in(args.backend)
    return pytest.main([path, "-k", "_Adam_ or _AdamW_", "-p", "no:cacheprovider", "--rootdir", os.path.dirname(path),
                        "-q", "-rfEs", *args.pytest_args])


if __name__ == "__main__":
    sys.exit(main())
