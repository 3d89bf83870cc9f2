"""WiSE-FT: weight-space ensembles of the zero-shot and the fine-tuned model (Wortsman et al., 2022)."""

from __future__ import annotations

import torch


def interpolate(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zero_shot + alpha * fine_tuned, for every floating-point tensor (others from fine_tuned)."""
    if zero_shot.keys() != fine_tuned.keys():
        raise ValueError("the two models have different parameters")
    return {k: torch.lerp(zero_shot[k].to(v), v, alpha) if v.is_floating_point() else v
            for k, v in fine_tuned.items()}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the module's state."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
