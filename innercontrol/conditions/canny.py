"""Canny (extra condition): kornia's canny at thresholds 0.1 / 0.2; no weights."""

from __future__ import annotations

from typing import Optional

import torch

from innercontrol.conditions.base import Condition, divide_by_max, register_condition

LOW_THRESHOLD = 0.1
HIGH_THRESHOLD = 0.2


@register_condition("canny")
class CannyCondition(Condition):
    """Differentiable output: kornia's edge magnitude (after non-maximum suppression, before the thresholds), divided
    by its per-sample max so the strongest edge is 1; dividing rather than clamping keeps a gradient on every edge.

    The thresholded (hysteresis) edges have zero gradient, so they serve the F1 metric only.
    """

    metric = "f1"

    def __init__(self, model_path: Optional[str] = None, purpose: str = "reward", trust_pickle: bool = False):
        if model_path is not None:
            raise ValueError(f"canny has no weights; got model_path={model_path!r}")
        super().__init__(None)

    def _canny(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from kornia.filters import canny

        return canny(images.float(), low_threshold=LOW_THRESHOLD, high_threshold=HIGH_THRESHOLD)

    def control_map(self, images: torch.Tensor) -> torch.Tensor:
        magnitude, _ = self._canny(images)
        return divide_by_max(magnitude)

    @torch.no_grad()
    def binary_edges(self, images: torch.Tensor) -> torch.Tensor:
        """Binary edge map (B,1,H,W) in {0,1} (after non-maximum suppression and hysteresis), for the F1 metric."""
        _, edges = self._canny(images)
        return (edges > 0.5).to(images.dtype)
