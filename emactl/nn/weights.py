"""Loading state dicts strictly, with one line that says what does not fit."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError


def fill_batch_counters(state: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add BatchNorm ``num_batches_tracked`` counters that files from older PyTorch lack."""
    state = dict(state)
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    return state


def strict_load(module: nn.Module, state: dict[str, Tensor], where: str, hint: str) -> None:
    """Load ``state`` strictly; a mismatch is one line naming missing, unexpected and misshapen keys."""
    own = module.state_dict()
    state = fill_batch_counters(state, own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        shapes = f" ({tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})" if wrong else ""
        raise UserError(
            f"{where}: {len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(wrong)} of wrong shape (e.g. {wrong[:2]}{shapes}); {hint}"
        )
    with torch.no_grad():
        module.load_state_dict(state, strict=True)
