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


# torch.save writes a zip archive; its legacy format (before torch 1.6, or _use_new_zipfile_serialization=False) is a
# pickle stream whose first object is this magic number.
ZIP_SIGNATURE = b"PK\x03\x04"
LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def looks_like_torch_save(path) -> bool:
    """Whether the file starts as torch.save output does: anything else (random bytes, an HTML error page, a
    safetensors file) is not worth unpickling, and unpickling it can fail with errors as unhelpful as MemoryError."""
    with open(path, "rb") as f:
        head = f.read(32)
    return head.startswith(ZIP_SIGNATURE) or (head.startswith(b"\x80") and LEGACY_MAGIC in head)
