"""Condition models: image (B,3,H,W) in [0,1] -> control map in [0,1], differentiable, frozen.

    cond = get_condition("depth", model_path=None, device="cuda", purpose="reward")
    control = cond(images)

Adding a condition: one new file with a `@register_condition("name")` Condition subclass, plus its import below.
"""

# The registry: importing a condition's module registers it.
from innercontrol.conditions import canny, depth, hed, lineart  # noqa: F401
from innercontrol.conditions.base import (
    CONDITIONS,
    EPS,
    CheckpointError,
    Condition,
    channel_mean,
    condition_options,
    divide_by_max,
    get_condition,
    min_max,
    register_condition,
    to_three_channels,
)

__all__ = [
    "CONDITIONS",
    "EPS",
    "CheckpointError",
    "Condition",
    "channel_mean",
    "condition_options",
    "divide_by_max",
    "get_condition",
    "min_max",
    "register_condition",
    "to_three_channels",
]
