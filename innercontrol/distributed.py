"""Helpers for runs launched with `accelerate launch` on several processes."""

from __future__ import annotations


def finish(accelerator) -> None:
    """Wait for the main process's final writes, then end together (end_training closes the trackers and the
    process group): a process that exits while the others still use the group can abort them (gloo on CPU)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
