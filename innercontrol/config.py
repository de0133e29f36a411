"""Typed configuration: one schema with defaults, YAML files in configs/ override it, key=value overrides those.

cfg = load_config("configs/depth.yaml", ["optim.lr=2e-5", "data.resolution=256"])
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# YAML 1.1 reads these as booleans; a boolean key accepts them as strings too, so quoting them is safe.
YAML_BOOL_WORDS = ("no", "yes", "on", "off", "y", "n")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    # A hub id or a local folder in the diffusers layout (python -m innercontrol.tiny writes one).
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # ControlNet to start from (hub id or folder); null = initialise from the UNet (ControlNetModel.from_unet).
    controlnet: Optional[str] = None
    revision: Optional[str] = None
    variant: Optional[str] = None
    # Decoder features the probe reads: "attn" (InnerControl) or "conv" (Readout Guidance).
    tap: str = "attn"
    gradient_checkpointing: bool = False
    # Also checkpoint the VAE decoder that the reward loss backpropagates through (less memory, ~+30% reward cost;
    # only used where the reward runs eagerly: on the CPU or with reward_cuda_graph=false).
    vae_gradient_checkpointing: bool = False
    # CUDA: replay the reward's VAE decode + condition model (forward and backward) from captured CUDA graphs;
    # same value and gradient, far fewer kernel launches (innercontrol/reward.py).
    reward_cuda_graph: bool = True
    # Largest number of in-window samples one reward graph replay takes (graphs of 1, 2, 4, ... up to it); its
    # memory pool holds the activations of that many samples (about 4 GiB each at 512 px in bf16).
    reward_cuda_graph_max_chunk: int = 4


@dataclass
class ConditionConfig:
    # Registered condition: depth, hed, lineart, canny.
    name: str = "depth"
    # Weights of the differentiable condition model used as the reward model; null = the published default.
    reward_model: Optional[str] = None
    # Weights of the condition model used to score generated images; null = the published default.
    eval_model: Optional[str] = None


@dataclass
class DataConfig:
    # Hub dataset id, local parquet file/folder, imagefolder with metadata.jsonl, or save_to_disk folder.
    dataset: str = "limingcv/MultiGen-20M_depth"
    split: str = "train"
    # null = stream hub datasets, read local ones in full.
    streaming: Optional[bool] = None
    image_column: str = "image"
    caption_column: str = "text"
    # Column holding the control image; null = compute it from the image with the condition model.
    control_column: Optional[str] = "control_depth"
    resolution: int = 512
    # Fraction of captions replaced by "" (for classifier-free guidance).
    caption_dropout: float = 0.0
    shuffle_buffer: int = 1000
    num_workers: int = 4
    # Stop when more than this fraction of the rows read so far could not be decoded.
    max_bad_fraction: float = 0.01
    max_samples: Optional[int] = None


@dataclass
class LossConfig:
    # Cycle-consistency (ControlNet++) reward term, applied where t lies in reward_window (inclusive).
    reward_weight: float = 0.5
    reward_window: list[int] = field(default_factory=lambda: [0, 400])
    # InnerControl alignment term, applied where t lies in alignment_window (inclusive).
    alignment_weight: float = 1.0
    alignment_window: list[int] = field(default_factory=lambda: [0, 920])


@dataclass
class ProbeConfig:
    # Pretrained probe (our folder or a published .pt); needed when loss.alignment_weight > 0.
    path: Optional[str] = None
    # Trust a pickled .pt probe that cannot be read with weights_only=True (runs code from the file).
    trust_pickle: bool = False
    projection_dim: int = 384
    # Probe pretraining (python -m innercontrol.train_probes).
    loss: str = "mse"  # "mse" or "balanced" (mean over background + mean over foreground, for edges)
    use_controlnet: bool = False  # run the frozen ControlNet (model.controlnet) during probe pretraining
    empty_prompt: bool = True  # Readout Guidance pretrains with the empty prompt
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 8
    max_steps: int = 5000
    eval_samples: int = 64
    # Held-out outputs whose mean per-pixel std across samples falls below this are reported as collapsed.
    collapse_std: float = 0.02


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant_with_warmup"
    warmup_steps: int = 10
    max_steps: int = 10000
    batch_size: int = 8  # per process
    gradient_accumulation: int = 4
    mixed_precision: str = "fp16"  # "no", "fp16", "bf16"
    use_ema: bool = True
    ema_decay: float = 0.9999


@dataclass
class LoggingConfig:
    output_dir: str = "outputs/run"
    log_every: int = 10
    checkpoint_every: int = 500
    checkpoint_total_limit: int = 3
    # null = start fresh; "latest" = newest checkpoint in output_dir; or a checkpoint folder.
    resume: Optional[str] = None
    validation_every: int = 500
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a living room", "a cat on a sofa"])
    validation_images: list[str] = field(default_factory=list)
    report_to: str = "tensorboard"


@dataclass
class EvalConfig:
    dataset: str = "limingcv/MultiGen-20M_depth_eval"
    split: str = "validation"
    image_column: str = "image"
    caption_column: str = "text"
    control_column: Optional[str] = "control_depth"
    output_dir: str = "outputs/eval"
    resolution: int = 512
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    negative_prompt: str = "worst quality, low quality"
    images_per_prompt: int = 4
    batch_size: int = 4
    seed: int = 42
    max_samples: Optional[int] = None
    mixed_precision: str = "fp16"
    clip_model: str = "openai/clip-vit-base-patch16"
    # Local Inception weights for clean-fid on offline machines; null = clean-fid's own download.
    inception_weights: Optional[str] = None


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def valid_keys(schema: Any = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts."""
    keys = []
    for f in fields(schema):
        name = prefix + f.name
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.extend(valid_keys(type(default), name + "."))
        else:
            keys.append(name)
    return keys


def _check_keys(tree: Any, source: str, prefix: str = "") -> None:
    allowed = set(valid_keys())
    sections = {k.rsplit(".", 1)[0] for k in allowed if "." in k}
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in sections:
            _check_keys(value, source, dotted + ".")
        elif dotted not in allowed:
            close = difflib.get_close_matches(dotted, sorted(allowed | sections), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else "run with --print-config to list the valid keys"
            raise ConfigError(f"unknown config key '{dotted}' in {source}: {hint}")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> DictConfig:
    """Schema defaults <- YAML file <- key=value overrides; unknown keys and wrong types raise ConfigError."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist (the experiments are in configs/)")
        file_cfg = OmegaConf.load(path)
        _check_keys(OmegaConf.to_container(file_cfg), path)
        cfg = _merge(cfg, file_cfg, path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=2e-5)")
        key, value = item.split("=", 1)
        if value.strip().lower() in YAML_BOOL_WORDS:  # keep `optim.mixed_precision=no` a string, not False
            item = f'{key}="{value.strip()}"'
        cli_cfg = OmegaConf.from_dotlist([item])
        _check_keys(OmegaConf.to_container(cli_cfg), "the command line")
        cfg = _merge(cfg, cli_cfg, f"override '{item}'")
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"bad value in {source} for '{key}': {err.msg if hasattr(err, 'msg') else err}") from None


def _validate(cfg: DictConfig) -> None:
    for name in ("reward_window", "alignment_window"):
        window = cfg.loss[name]
        if len(window) != 2 or not 0 <= window[0] <= window[1] <= 999:
            raise ConfigError(f"loss.{name} must be [t_min, t_max] with 0 <= t_min <= t_max <= 999, got {list(window)}")
    choices = {
        "model.tap": ("attn", "conv"),
        "optim.mixed_precision": ("no", "fp16", "bf16"),
        "eval.mixed_precision": ("no", "fp16", "bf16"),
        "probe.loss": ("mse", "balanced"),
    }
    for dotted, allowed in choices.items():
        value = OmegaConf.select(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
    if cfg.model.reward_cuda_graph_max_chunk < 1:
        raise ConfigError(
            "model.reward_cuda_graph_max_chunk is the number of samples one reward graph replay takes and must be "
            f">= 1, got {cfg.model.reward_cuda_graph_max_chunk}"
        )
    if not 0.0 <= cfg.data.caption_dropout <= 1.0:
        raise ConfigError(f"data.caption_dropout must lie in [0, 1], got {cfg.data.caption_dropout}")


def precision_dtype(mixed_precision: str):
    """torch dtype of a mixed-precision setting ("no", "fp16", "bf16"; validated by load_config)."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def describe_schema() -> str:
    """Markdown table of every key with its default (for the README's configuration reference)."""
    defaults = OmegaConf.structured(Config)
    rows = ["| key | default |", "| --- | --- |"]
    for key in valid_keys():
        value = OmegaConf.select(defaults, key)
        if isinstance(value, DictConfig) or hasattr(value, "__iter__") and not isinstance(value, str):
            value = OmegaConf.to_container(value) if not isinstance(value, str) else value
        rows.append(f"| `{key}` | `{value}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    # python -m innercontrol.config: the configuration reference table (pasted into the README by a test check)
    print(describe_schema())
