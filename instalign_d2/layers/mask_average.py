"""Features averaged over soft masks: what the model's mask-pooled queries and the synthetic
backbone pre-training both read of an object."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def average_over_masks(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` features averaged over each of ``(B, N, H, W)`` non-negative mask weights
    -> ``(B, N, C)``. Weights of another size are resized to ``h x w`` by area, which keeps the
    share of each feature cell a mask covers: an object smaller than a cell still gets that
    cell's features (weighted), not nothing."""
    weights = weights.float()
    if weights.shape[-2:] != features.shape[-2:]:
        weights = F.interpolate(weights, size=features.shape[-2:], mode="area")
    pooled = torch.einsum("bnhw,bchw->bnc", weights, features.float())
    return (pooled / weights.sum((-2, -1))[..., None].clamp_min(1e-6)).to(features.dtype)
