"""The condition base class, its registry, the shared per-sample normalisations and the checkpoint loader."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from innercontrol.hub import HubUnreachableError, resolve_file
from innercontrol.state_dicts import looks_like_torch_save, mismatches

EPS = 1e-6  # guards every per-sample division (a constant map has max == min)
PURPOSES = ("reward", "eval")

CONDITIONS: dict[str, type[Condition]] = {}


class CheckpointError(ValueError):
    """A condition checkpoint that is missing, unreadable, or does not match the architecture."""


def register_condition(name: str) -> Callable[[type[Condition]], type[Condition]]:
    """Class decorator: `@register_condition("depth")` makes the class available to get_condition("depth")."""

    def add(cls: type[Condition]) -> type[Condition]:
        if name in CONDITIONS:
            raise ValueError(f"condition '{name}' is registered twice ({CONDITIONS[name].__name__}, {cls.__name__})")
        cls.name = name
        CONDITIONS[name] = cls
        return cls

    return add


def get_condition(
    name: str,
    model_path: Optional[str] = None,
    device: str | torch.device = "cpu",
    purpose: str = "reward",
    trust_pickle: bool = False,
    **options,
) -> Condition:
    """The frozen, differentiable condition `name`; model_path = local file/folder or hub id, None = published default.

    purpose "reward" or "eval" picks the published default where the two differ (depth). trust_pickle=True allows
    a .pth checkpoint that cannot be read with weights_only=True (unpickling runs code from the file). options go to
    the condition's constructor (condition_options reads them from the config).
    """
    if name not in CONDITIONS:
        raise KeyError(f"unknown condition '{name}'; registered conditions: {', '.join(sorted(CONDITIONS))}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r} is not one of {', '.join(PURPOSES)}")
    return CONDITIONS[name](model_path=model_path, purpose=purpose, trust_pickle=trust_pickle, **options).to(device)


def condition_options(condition_cfg) -> dict:
    """The config keys `condition.<name>_<option>` of the selected condition, as {option: value}."""
    prefix = f"{condition_cfg.name}_"
    return {key[len(prefix) :]: condition_cfg[key] for key in condition_cfg if key.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------
# Per-sample normalisations shared by the conditions (maps are (B,C,H,W); statistics are over C,H,W per sample).


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=1, keepdim=True)


def per_sample_max(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).amax(dim=1).view(-1, *([1] * (x.ndim - 1)))


def per_sample_min(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).amin(dim=1).view(-1, *([1] * (x.ndim - 1)))


def divide_by_max(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x / its per-sample max (x >= 0 expected)."""
    return x / per_sample_max(x).clamp_min(eps)


def min_max(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(x - min) / (max - min) per sample, in [0, 1]."""
    low = per_sample_min(x)
    return (x - low) / (per_sample_max(x) - low).clamp_min(eps)


def to_three_channels(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return x
    if x.shape[1] != 1:
        raise ValueError(f"expected a 1- or 3-channel map, got {x.shape[1]} channels")
    return x.repeat(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------------------


class Condition(nn.Module):
    """A frozen model mapping RGB images in [0,1] (B,3,H,W) to the control map in [0,1] (B,3,H,W), differentiably.

    Subclasses implement `control_map`; they override the two alignment normalisations where DESIGN 3 says so.
    """

    name: str = ""
    metric: str = ""  # "rmse" | "ms_ssim" | "f1"

    def __init__(self, model: Optional[nn.Module]):
        super().__init__()
        self.model = model
        if model is not None:
            model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Condition:
        # Always eval: a parent's .train() must not switch the frozen model's dropout or norm layers on.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected RGB images (B,3,H,W) in [0,1], got shape {tuple(images.shape)}")
        return to_three_channels(self.control_map(images)).clamp(0.0, 1.0).to(images.dtype)

    def control_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,1 or 3,H,W) in [0,1]."""
        raise NotImplementedError

    def normalize_probe_output(self, pred01: torch.Tensor) -> torch.Tensor:
        """Probe prediction mapped to [0,1] -> the map the alignment loss compares with normalize_label(control)."""
        return pred01

    def normalize_label(self, control: torch.Tensor) -> torch.Tensor:
        """Control map in [0,1] -> the alignment label."""
        return to_three_channels(control)

    def reward_prediction(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images in [0,1] -> the map the cycle-consistency reward compares with reward_label(control)."""
        return self(images)

    def reward_label(self, control: torch.Tensor) -> torch.Tensor:
        """Control map in [0,1] -> the reward's label."""
        return to_three_channels(control)

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ---------------------------------------------------------------------------------------------------------------
# Published .pth checkpoints (HED, line art): located, read without unpickling code, matched strictly.


def checkpoint_file(model_path: Optional[str], repo_id: str, filename: str, what: str, purpose: str) -> str:
    """Local path of a .pth checkpoint: model_path (file, folder holding `filename`, or hub repo id) or the default."""
    config_key = f"condition.{purpose}_model"
    if model_path is None:
        return _resolve_hub_file(repo_id, filename, what, config_key)
    model_path = str(model_path)
    path = Path(model_path).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        if (path / filename).is_file():
            return str(path / filename)
        raise CheckpointError(
            f"{what}: folder '{path}' has no {filename}; download it from the hub repository {repo_id} "
            f"(`hf download {repo_id} {filename} --local-dir {path}`) or pass the .pth file itself"
        )
    if model_path.count("/") == 1 and not model_path.startswith((".", "/", "~")):
        return _resolve_hub_file(model_path, filename, what, config_key)
    raise CheckpointError(
        f"{what}: checkpoint '{model_path}' does not exist; the published file is {filename} in the hub repository "
        f"{repo_id} (`hf download {repo_id} {filename} --local-dir DIR`), pass {config_key}=DIR/{filename}"
    )


def _resolve_hub_file(repo_id: str, filename: str, what: str, config_key: str) -> str:
    try:
        return resolve_file(repo_id, filename, what, config_key)
    except HubUnreachableError as err:
        raise HubUnreachableError(f"{err} (in Python: get_condition(..., model_path=DIR/{filename}))") from None


def load_checkpoint(
    module: nn.Module, path: str | os.PathLike, repo_id: str, filename: str, trust_pickle: bool = False
) -> None:
    """Load a state dict from a .pth file into `module`, strictly; every mismatch is listed with expected shapes."""
    source = f"the published file is {filename} in the hub repository {repo_id}"
    if not looks_like_torch_save(path):  # random bytes can fail to unpickle in any way, even with MemoryError
        raise CheckpointError(f"{path} is not a torch checkpoint (damaged, or a file of another kind); {source}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if trust_pickle:  # not a weights_only refusal: the pickle itself is broken
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({err}); {source}") from None
        raise CheckpointError(
            f"{path} holds objects other than tensors and cannot be read with torch.load(weights_only=True) "
            f"(unpickling it would run code from the file). If you trust the file, pass trust_pickle=True to "
            f"get_condition. ({str(err).splitlines()[0]})"
        ) from None
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err}); {source}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (key -> tensor); {source}")
    expected = module.state_dict()
    found = mismatches(expected, state)
    missing = [f"{k} (expected {list(expected[k].shape)})" for k in found["missing"]]
    unexpected, mismatched = found["unexpected"], found["shape"]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(f'{k} {list(state[k].shape)}' for k in unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch: {'; '.join(mismatched)}")
        raise CheckpointError(
            f"{path} does not match the {type(module).__name__} architecture ({' | '.join(problems)}); {source}"
        )
    module.load_state_dict(state, strict=True)
