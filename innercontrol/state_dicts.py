"""Strict state-dict matching with a readable account of what does not fit (shared by every weight loader)."""

from __future__ import annotations

import torch


def mismatches(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Missing keys, unexpected keys and shape mismatches ('key: expected (..), found (..)'); empty lists = fits."""
    return {
        "missing": [k for k in expected if k not in found],
        "unexpected": [k for k in found if k not in expected],
        "shape": [
            f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
            for k in expected
            if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
        ],
    }
