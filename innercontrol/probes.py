"""Control-prediction probes: the aggregation network H(features, t) of DESIGN section 2.

Each tapped decoder map goes through a timestep-conditioned bottleneck block to `projection_dim`
channels at the largest feature resolution; a softmax-normalised learnable weight per layer mixes the blocks; a small conv head with a
Tanh gives a 3-channel map in [-1, 1] at the largest feature resolution.

    probe = load_probe("checkpoints/probes/depth")          # our folder (safetensors + JSON)
    probe = load_probe("readout_depth.pt")                   # published {"config", "aggregation_network"}
    pred = probe(features, time_embedding)                   # (B, 3, h, w) in [-1, 1]
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from innercontrol.state_dicts import looks_like_torch_save, mismatches

CONFIG_NAME = "probe_config.json"
WEIGHTS_NAME = "probe.safetensors"


TIMESTEP_INPUTS = ("t", "step_index")


class ProbeLoadError(ValueError):
    """A probe checkpoint that cannot be read or does not fit."""


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in the published probes; fewer when a tiny width is not divisible by 32.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize; computed in float32, whose backward is much faster than bf16/fp16's on CUDA."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False).to(x.dtype)


class NormedConv2d(nn.Conv2d):
    """Bias-free convolution followed by GroupNorm (state-dict keys `weight`, `norm.weight`, `norm.bias`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = _group_norm(out_channels)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        """conv, optional bilinear resize to `size`, GroupNorm. Resizing after a 1x1 conv equals resizing
        before it (both are linear, bilinear weights sum to 1) and touches C_out instead of C_in channels."""
        x = super().forward(x)
        return self.norm(x if size is None else resize(x, size))


class BottleneckBlock(nn.Module):
    """C_l -> P bottleneck with the UNet time embedding added after the first convolution."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int | None):
        super().__init__()
        hidden = out_channels // 4
        self.conv1 = NormedConv2d(in_channels, hidden, 1)
        self.conv2 = NormedConv2d(hidden, hidden, 3)
        self.conv3 = NormedConv2d(hidden, out_channels, 1)
        self.shortcut = NormedConv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.emb_layers = nn.Linear(embedding_dim, hidden) if embedding_dim else None

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor | None, size=None) -> torch.Tensor:
        """x at its own resolution; the block's output is at `size` (default: x's).

        Same result as resizing x first, since conv1 and the shortcut are 1x1 convolutions."""
        size = tuple(x.shape[-2:]) if size is None else tuple(size)
        h = F.relu(self.conv1(x, size))
        if self.emb_layers is not None and time_embedding is not None:
            h = h + F.relu(self.emb_layers(time_embedding))[:, :, None, None]
        h = F.relu(self.conv2(h))
        h = self.conv3(h)
        skip = resize(x, size) if self.shortcut is None else self.shortcut(x, size)
        return F.relu(h + skip)


class _SequentialBlock(nn.Sequential):
    """Published `bottleneck_sequential=True` layout (keys `bottleneck_layers.N.0.*`); ignores t.

    The published network creates `emb_layers` in every block, so these checkpoints carry its weights: they are
    loaded (strict key match) and never used."""

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor | None = None, size=None) -> torch.Tensor:
        return self[0](x, None, size)


@dataclass
class ProbeConfig:
    feature_dims: list[int]
    projection_dim: int = 384
    timestep_embedding_dim: int = 1280
    output_channels: int = 3
    timestep_conditioned: bool = True
    # Which time the probe embeds: "t" (the real timestep; InnerControl, ours) or "step_index" (999 - t, the index
    # Readout Guidance's heads were trained with; see TIMESTEP_INPUTS).
    timestep_input: str = "t"
    # Provenance (not needed to build the network).
    tap: str | None = None
    condition: str | None = None
    extra: dict = field(default_factory=dict)


class ControlProbe(nn.Module):
    """Aggregation network: list of tapped maps + UNet time embedding -> control prediction in [-1, 1]."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        self.config = config
        if config.timestep_input not in TIMESTEP_INPUTS:
            raise ProbeLoadError(f"probe timestep_input={config.timestep_input!r} is not one of {TIMESTEP_INPUTS}")
        blocks = [
            BottleneckBlock(dim, config.projection_dim, config.timestep_embedding_dim) for dim in config.feature_dims
        ]
        if not config.timestep_conditioned:
            blocks = [_SequentialBlock(block) for block in blocks]
        self.bottleneck_layers = nn.ModuleList(blocks)
        self.mixing_weights = nn.Parameter(torch.ones(len(config.feature_dims)))
        self.output_head = nn.Sequential(
            nn.Conv2d(config.projection_dim, 128, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(128, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, config.output_channels, 1),
            nn.Tanh(),
        )

    def probe_timesteps(self, timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
        """The timesteps whose UNet embedding this probe reads: t, or 999 - t for step-index heads."""
        if self.config.timestep_input == "step_index":
            return (num_train_timesteps - 1) - timesteps
        return timesteps

    def check_features(self, features: list[torch.Tensor]) -> None:
        found = [f.shape[1] for f in features]
        if found != list(self.config.feature_dims):
            raise ProbeLoadError(
                f"probe expects {len(self.config.feature_dims)} tapped maps with channels {list(self.config.feature_dims)}, "
                f"found {len(found)} with channels {found}: the probe was trained for another UNet or tap mode "
                f"(probe tap: {self.config.tap}); set model.tap to match or use a probe trained for this model"
            )

    def forward(self, features: list[torch.Tensor], time_embedding: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        size = max((f.shape[-2:] for f in features), key=lambda hw: hw[0] * hw[1])
        weights = torch.softmax(self.mixing_weights, dim=0)
        dtype = self.mixing_weights.dtype
        time_embedding = time_embedding.to(dtype)
        mixed = 0
        for weight, block, feature in zip(weights, self.bottleneck_layers, features):
            mixed = mixed + weight * block(feature.to(dtype), time_embedding, size)
        return self.output_head(mixed)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write probe.safetensors + probe_config.json (temp names, then renamed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / (WEIGHTS_NAME + ".tmp"))
        (folder / (CONFIG_NAME + ".tmp")).write_text(json.dumps(asdict(self.config), indent=2))
        (folder / (WEIGHTS_NAME + ".tmp")).replace(folder / WEIGHTS_NAME)
        (folder / (CONFIG_NAME + ".tmp")).replace(folder / CONFIG_NAME)
        return folder


def load_probe(
    path: str | Path, trust_pickle: bool = False, map_location: str = "cpu", timestep_input: str | None = None
) -> ControlProbe:
    """Load our folder format or a published `.pt` file (strict key match); the probe is in eval mode.

    timestep_input ("t" or "step_index", config key probe.timestep_input) overrides the time the probe embeds;
    None keeps the folder's own setting, and reads a published file with the real t after a warning (a Readout
    Guidance head was trained on the step index 999 - t: read with t, it sees mirrored time).
    """
    path = Path(path)
    if timestep_input is not None and timestep_input not in TIMESTEP_INPUTS:
        raise ProbeLoadError(f"probe.timestep_input={timestep_input!r} is not one of {', '.join(TIMESTEP_INPUTS)}")
    if path.is_dir():
        probe = _load_folder(path)
    elif path.is_file():
        probe = _load_published(path, trust_pickle, map_location)
        if timestep_input is None:
            warnings.warn(
                f"probe '{path}' is a published .pt file, read with the real timestep t. Readout Guidance heads were "
                f"trained on the step index 999 - t (read with t they see mirrored time): for such a head set "
                f"probe.timestep_input=step_index; set probe.timestep_input=t to silence this for a head trained on t",
                stacklevel=2,
            )
    else:
        raise ProbeLoadError(
            f"probe '{path}' does not exist: train one with train/train_probes.sh CONDITION "
            f"or pass a published .pt file as probe.path"
        )
    if timestep_input is not None:
        probe.config.timestep_input = timestep_input
    return probe.eval()


def _load_folder(folder: Path) -> ControlProbe:
    from safetensors.torch import load_file

    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise ProbeLoadError(
                f"probe folder '{folder}' lacks {needed.name} (written by ControlProbe.save_pretrained)"
            )
    try:
        config = ProbeConfig(**json.loads(config_file.read_text()))
    except (ValueError, TypeError) as err:  # not JSON, or not the keys of ProbeConfig
        raise ProbeLoadError(
            f"'{config_file}' is not a probe config ({type(err).__name__}: {err}); it is written by "
            f"ControlProbe.save_pretrained: retrain the probe or restore the file"
        ) from None
    probe = ControlProbe(config)
    try:
        state = load_file(weights_file)
    except Exception as err:  # safetensors raises SafetensorError ("header too large") for a corrupt file
        raise ProbeLoadError(
            f"'{weights_file}' is not a safetensors checkpoint ({type(err).__name__}: {err}); the file is damaged: "
            f"retrain the probe or copy {WEIGHTS_NAME} again"
        ) from None
    _load_strict(probe, state, weights_file)
    return probe


def _load_published(file: Path, trust_pickle: bool, map_location: str) -> ControlProbe:
    unreadable = (
        f"probe file '{file}' is not a checkpoint torch.load can read (a probe is a folder with {WEIGHTS_NAME} "
        f"and {CONFIG_NAME}, or a published .pt file): the file is damaged or of another kind; download or copy it "
        f"again, or pass another probe.path"
    )
    if not looks_like_torch_save(file):
        raise ProbeLoadError(unreadable)
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses what is not tensors and plain containers
        if not trust_pickle:
            raise ProbeLoadError(
                f"'{file}' cannot be read with torch.load(weights_only=True) ({str(err).splitlines()[0]}): it needs "
                f"full unpickling, which runs code from the file. If you trust it, pass probe.trust_pickle=true "
                f"(load_probe(..., trust_pickle=True))"
            ) from None
        try:
            checkpoint = torch.load(file, map_location=map_location, weights_only=False)
        except Exception as full_err:  # a damaged file can fail in any way, even with MemoryError
            raise ProbeLoadError(f"{unreadable} ({type(full_err).__name__}: {full_err})".replace(": )", ")")) from None
    except Exception as err:
        raise ProbeLoadError(f"{unreadable} ({type(err).__name__}: {err})".replace(": )", ")")) from None
    if not isinstance(checkpoint, dict) or "aggregation_network" not in checkpoint or "config" not in checkpoint:
        found = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ProbeLoadError(
            f"'{file}' is not a probe checkpoint: expected a dict with 'config' and 'aggregation_network' "
            f"(Readout Guidance / InnerControl format), found {found}"
        )
    state, published = checkpoint["aggregation_network"], checkpoint["config"]
    kwargs = published.get("aggregation_kwargs", {}) or {}
    sequential = bool(kwargs.get("bottleneck_sequential", False)) or any(
        k.startswith("bottleneck_layers.0.0.") for k in state
    )
    if sequential:
        warnings.warn(
            f"probe '{file}' was saved with bottleneck_sequential=True: its blocks ignore the timestep", stacklevel=2
        )
    embedding_key = "bottleneck_layers.0.emb_layers.weight"
    try:
        config = ProbeConfig(
            feature_dims=[int(d) for d in published["dims"]],
            projection_dim=int(published["projection_dim"]),
            timestep_embedding_dim=int(state[embedding_key].shape[1]) if embedding_key in state else 1280,
            output_channels=int(kwargs.get("output_head_channels", 3)),
            timestep_conditioned=not sequential,
            extra={k: published[k] for k in ("save_timestep", "num_timesteps") if k in published},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ProbeLoadError(
            f"'{file}' is not a probe checkpoint: its 'config' needs 'dims' (channels of the tapped maps) and "
            f"'projection_dim' as Readout Guidance writes them ({type(err).__name__}: {err})"
        ) from None
    probe = ControlProbe(config)
    _load_strict(probe, state, file)
    return probe


def _load_strict(probe: ControlProbe, state: dict[str, torch.Tensor], source: Path) -> None:
    found = mismatches(probe.state_dict(), state)
    labels = {"missing": "missing keys", "unexpected": "unexpected keys", "shape": "shape mismatches"}
    parts = [f"{labels[kind]} {items[:5]}{' ...' if len(items) > 5 else ''}" for kind, items in found.items() if items]
    if parts:
        raise ProbeLoadError(f"probe checkpoint '{source}' does not match its config: " + "; ".join(parts))
    probe.load_state_dict(state, strict=True)


def build_probe(
    feature_dims: list[int], projection_dim: int, timestep_embedding_dim: int, **provenance
) -> ControlProbe:
    """A fresh probe for the given tapped channels (probe pretraining starts here)."""
    return ControlProbe(ProbeConfig(list(feature_dims), projection_dim, timestep_embedding_dim, **provenance))
