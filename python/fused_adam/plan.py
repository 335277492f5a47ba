"""The step plan: each param group split once into partitions, each stepped by one backend.

NOTE [step plan]: building the per-group lists (params with grads, their states, partitions, chosen backends) is
the per-parameter Python work that dominates torch's step() for many small tensors. It is done once per group and
kept in a Plan, which a step reuses while it is valid (Plan.valid). Everything that torch's for-loop would see
changed is either seen by that check or by the backend's per-tensor checks, at O(1) Python cost per step:
  * the group's params list: the same list object, the same length, and the same items (one identity compare per
    item, in C++ where the extension is built);
  * the options that shape the plan (the plan key: amsgrad, capturable, the options beyond torch, weight decay on
    or off, a Tensor lr or not);
  * the optimizer's state: a _State bumps its optimizer's generation when a tensor in it is replaced; add_param_group
    and load_state_dict drop every plan;
  * which params have grads (a grad that appears or disappears rebuilds the plan);
  * per tensor, every step, in the backend's check pass: the param's, grad's and states' shapes, dtypes, devices
    and layouts (a `.data` replaced with a tensor of another shape raises; one of the same shape is stepped where
    it now lives). Values changed in place (step counts, moments, a Tensor lr) are read where they live.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .backends import Backend, PartOptions


@dataclass(frozen=True)
class Dispatch:
    """Which backend ran one (device, dtype) partition of a param group, and why the others did not."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    skipped: dict[str, str] = field(default_factory=dict)
    num_params: int = 0


@dataclass(eq=False)
class Partition:
    """One (device, dtype, occurrence) partition of a param group: the tensors one backend call steps.

    Lists are aligned (entry i of each belongs to param i of the partition) and hold what a kernel sees: a complex
    tensor's view_as_real, a DTensor's local shard (views of the optimizer's tensors, so in-place updates land)."""

    group_index: int
    device: torch.device
    dtype: torch.dtype
    options: PartOptions
    index: list[int] | None  # positions in the group's params; None: all of them, in order
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]  # empty unless options.amsgrad
    state_steps: list[Tensor]
    master_params: list[Tensor]  # fp32 masters (options.master), else empty
    tensor_ids: list[int]  # each param's index over all groups (stochastic rounding's stream id)
    view_pos: list[int]  # positions whose grads need kernel_view (complex or DTensor params)
    reads_grads: bool = False  # every param is a plain Tensor/Parameter of the group, in order: grads=None offered
    backend: Backend | None = None
    dispatch: Dispatch | None = None
    prepared: Any = None  # what backend.prepare() keeps for the life of this partition

    def __len__(self) -> int:
        return len(self.params)

    def grads_from_params(self) -> list[Tensor] | None:
        """Each param's .grad (for a backend offered grads=None that does not read them natively), or None if a
        param has none."""
        grads = [p.grad for p in self.params]
        return None if any(g is None for g in grads) else grads

    def param_index(self, pos: int) -> int:
        """The group position of this partition's entry `pos` (error messages name the group's param index)."""
        return self.index[pos] if self.index is not None else pos
