"""Typed configuration: one schema with defaults, YAML files in configs/ override it, key=value overrides those.

cfg = load_config("configs/depth.yaml", ["optim.lr=2e-5", "data.resolution=256"])
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
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
    # A VAE (hub id or folder) replacing the base model's: SDXL in fp16 needs madebyollin/sdxl-vae-fp16-fix.
    vae: Optional[str] = None
    revision: Optional[str] = None
    variant: Optional[str] = None
    # Decoder features the probe reads: "attn" (InnerControl) or "conv" (Readout Guidance).
    tap: str = "attn"
    gradient_checkpointing: bool = False
    # torch.compile of the UNet's and ControlNet's blocks one by one (innercontrol/speed.py): small graphs, short
    # compile time; hooks (the probe's taps), checkpoints and saved weights unchanged.
    compile: bool = False
    # UNet and ControlNet convolutions in channels_last (NHWC) memory format, faster with cuDNN on recent GPUs.
    channels_last: bool = False
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
    # Depth reward normalisation. "max" (ControlNet++, the published objective): the prediction divided by its
    # per-sample max vs the control's channel mean divided by its max. "min_max" (ours): the prediction min-max
    # scaled per sample (as the MiDaS annotator made control_depth) vs the raw 3-channel control; it matches the
    # control's own scaling, whose minimum is 0 by construction. Keys named <condition>_<option> reach that
    # condition's model as the option <option> (innercontrol.conditions.condition_options).
    depth_reward_normalization: str = "max"


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
    # How training timesteps are drawn: "uniform" (the published method) or "cubic" (T2I-Adapter's t = (1 - u^3) T,
    # weighted toward high noise where the layout is decided; an option, see configs/mini.yaml).
    timestep_sampling: str = "uniform"
    # How the denoising MSE weighs each sample's timestep: "uniform" (the published method) or "v" (the epsilon MSE x
    # min(1 / alpha_bar_t, diffusion_weight_max) over its mean across t: the implied v's MSE, truncated, which shifts
    # the loss toward high noise, where sampling sets the layout; an option, measured on the miniature, see
    # configs/mini.yaml).
    diffusion_weighting: str = "uniform"
    diffusion_weight_max: float = 50.0
    # Multiplier of the denoising MSE in the sum (the published method: 1). Below 1 it gives the reward and
    # alignment terms a larger share; an option, measured on the miniature (configs/mini.yaml).
    diffusion_weight: float = 1.0
    # Corrective noising (an option of ours; the published method: 0): this share of the samples whose t lies in
    # corrective_window get a noisy latent made from another image of the batch, while the target still leads to
    # their own image. Training otherwise only shows the ControlNet noisy latents whose layout already matches the
    # control; in sampling they come from the model's own earlier steps, and a layout that went wrong is not pulled
    # back. Measured on the miniature (configs/mini.yaml).
    corrective_fraction: float = 0.0
    corrective_window: list[int] = field(default_factory=lambda: [500, 999])


@dataclass
class ProbeConfig:
    # Pretrained probe (our folder or a published .pt); needed when loss.alignment_weight > 0.
    path: Optional[str] = None
    # Trust a pickled .pt probe that cannot be read with weights_only=True (runs code from the file).
    trust_pickle: bool = False
    # Time the probe embeds: "t" or "step_index" (999 - t, how Readout Guidance trained its heads); null = the
    # probe folder's own setting, and "t" with a warning for a published .pt file.
    timestep_input: Optional[str] = None
    projection_dim: int = 384
    # Probe pretraining (python -m innercontrol.train_probes).
    # Its checkpoints and config.yaml (the probe itself goes to path); never ControlNet training's output_dir.
    output_dir: str = "outputs/probe_run"
    loss: str = "mse"  # "mse" or "balanced" (mean over background + mean over foreground, for edges)
    use_controlnet: bool = False  # run the frozen ControlNet (model.controlnet) during probe pretraining
    empty_prompt: bool = True  # Readout Guidance pretrains with the empty prompt
    lr: float = 1e-3
    weight_decay: float = 0.0  # Readout Guidance's recipe
    # Global batch (Readout Guidance: 8 on one device), divided over the processes; it must divide evenly.
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
    # "adamw" (torch.optim.AdamW, the published recipe), "adamw_fused" (the same update in one fused CUDA kernel
    # per step; CUDA only) or "adamw_8bit" (bitsandbytes' AdamW8bit: optimizer state in 8 bits, for smaller GPUs;
    # pip install bitsandbytes). bench/step_cost.py measures each.
    optimizer: str = "adamw"
    # TF32 matmuls for fp32 work on Ampere and later GPUs (torch.set_float32_matmul_precision("high"); torch runs
    # cuDNN convolutions in TF32 already); no effect on the CPU or on the bf16/fp16 parts of mixed precision.
    allow_tf32: bool = False
    # Cache the text encoder's embeddings of this many distinct captions (least recently used out first; the
    # empty caption of caption dropout stays); 0 = encode every batch, as the published training does.
    text_embedding_cache: int = 0
    # Keep the VAE latent distribution (mean, log-variance) of this many distinct training images, keyed by dataset
    # row (least recently used out first); each use still draws a fresh latent sample, so training is unchanged and
    # only the encoder's repeated work goes. For small map-style datasets seen for many epochs (the miniature: 576
    # rows). Memory per row: 2 x latent channels x latent pixels x 4 bytes in fp32 (SD1.5 at 512 px: 131 kB).
    # Probe training (train_probes) uses it too. 0 = encode every batch, as the published training does.
    latent_cache: int = 0
    # Learning-rate multiplier for the ControlNet's zero-initialised layers (the conditioning embedding's output
    # conv, controlnet_down_blocks, controlnet_mid_block); 1.0 = one lr for all, as published. Under Adam these
    # layers grow from zero by about lr per step, and until they do, no control reaches the UNet and no gradient
    # reaches the ControlNet's body: a larger multiplier shortens that start. Measured on the miniature in README.
    zero_conv_lr_scale: float = 1.0


@dataclass
class LoggingConfig:
    # ControlNet training's checkpoints, logs, config.yaml and final model (probe pretraining: probe.output_dir).
    output_dir: str = "outputs/run"
    log_every: int = 10
    checkpoint_every: int = 500
    checkpoint_total_limit: int = 3
    # null = start fresh; "latest" = newest checkpoint in output_dir; or a checkpoint folder.
    resume: Optional[str] = None
    # A fresh start into a folder holding another run's checkpoints, config.yaml or final model stops, unless
    # this is true: then that run's outputs are removed first.
    overwrite: bool = False
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
    # FID's features: "inception" (clean-fid, the published protocol) or "clip" (eval.clip_model's image embeddings;
    # the miniature's only meaningful features offline, not comparable with any published FID).
    fid_features: str = "inception"
    # What --controlnet names: a ControlNet ("controlnet") or a T2I-Adapter ("t2i_adapter", e.g.
    # TencentARC/t2iadapter_depth_sd15v2): the published evaluation's baseline kinds on the same prompts and seeds.
    model_kind: str = "controlnet"
    # Sampler: "auto" = the published one per kind (UniPC for ControlNets, Euler ancestral for T2I-Adapters).
    scheduler: str = "auto"
    # T2I-Adapter strength; null = the published setting (0.5 for the line-art adapter, 1.0 otherwise).
    adapter_conditioning_scale: Optional[float] = None
    # ControlNet strength: the multiplier of its residuals (diffusers' controlnet_conditioning_scale); 1.0 = the
    # published evaluation.
    controlnet_conditioning_scale: float = 1.0
    # A VAE that replaces the base model's in evaluation (hub id or folder): the published SDXL evaluation decodes
    # with madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE overflows in fp16); null = the base model's VAE.
    vae: Optional[str] = None


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


@dataclass(frozen=True)
class Range:
    """The values one key accepts: `accepts(value)` is true inside the range, `allowed` says it in words."""

    accepts: Callable[[Any], bool]
    allowed: str | Callable[[], str]
    meaning: str = ""  # what the key is, when its name does not say it

    def describe(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed

    def error(self, key: str, value: Any) -> str:
        meaning = f" ({self.meaning})" if self.meaning else ""
        shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        return f"{key}={shown!r} is not allowed: {key}{meaning} must be {self.describe()}"


def at_least(low: float, meaning: str = "") -> Range:
    return Range(lambda v: v >= low, f">= {low}", meaning)


def above(low: float, meaning: str = "") -> Range:
    return Range(lambda v: v > low, f"> {low}", meaning)


def within(low: float, high: float, meaning: str = "", open_high: bool = False) -> Range:
    if open_high:
        return Range(lambda v: low <= v < high, f"in [{low}, {high})", meaning)
    return Range(lambda v: low <= v <= high, f"in [{low}, {high}]", meaning)


def one_of(*choices: Any, meaning: str = "") -> Range:
    names = ", ".join("null" if c is None else str(c) for c in choices)
    return Range(lambda v: v in choices, f"one of {names}", meaning)


def optional(inner: Range) -> Range:
    """null, or a value inside `inner`."""
    return Range(lambda v: v is None or inner.accepts(v), lambda: f"null or {inner.describe()}", inner.meaning)


def _registered_conditions() -> list[str]:
    from innercontrol.conditions import CONDITIONS  # importing the package registers every condition

    return sorted(CONDITIONS)


ANY = Range(lambda v: True, "any")  # free text, or a path that its loader checks with its own message
NOT_EMPTY = Range(lambda v: bool(v.strip()), "a non-empty string")
# The VAE maps 8 x 8 pixels to one latent: other sizes fail deep inside the UNet, or only after generating.
PIXELS = Range(lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8 (the VAE encodes 8x8 pixel blocks)")
# Inside numpy's seed range, also after the small offsets processes and images add.
SEED = within(0, 2**31 - 1)
PRECISION = one_of("no", "fp16", "bf16")
# diffusers.optimization.get_scheduler names that need no extra arguments.
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# accelerate's trackers (log_with), plus "none".
TRACKERS = (
    "none",
    "tensorboard",
    "wandb",
    "trackio",
    "comet_ml",
    "aim",
    "mlflow",
    "clearml",
    "dvclive",
    "swanlab",
    "all",
)
TIMESTEP_WINDOW = Range(
    lambda w: len(w) == 2 and 0 <= w[0] <= w[1] <= 999, "[t_min, t_max] with 0 <= t_min <= t_max <= 999"
)

# The range of every key of the schema (booleans need none: the schema's types already hold them to true/false).
# tests/test_config.py checks that no key is left out.
RANGES: dict[str, Range] = {
    "seed": SEED,
    # model
    "model.pretrained_model": NOT_EMPTY,
    "model.controlnet": optional(NOT_EMPTY),
    "model.vae": optional(NOT_EMPTY),
    "model.revision": optional(NOT_EMPTY),
    "model.variant": optional(NOT_EMPTY),
    "model.tap": one_of("attn", "conv"),
    "model.reward_cuda_graph_max_chunk": at_least(1, "the number of samples one reward graph replay takes"),
    # condition
    "condition.name": Range(
        lambda v: v in _registered_conditions(),
        lambda: "a registered condition: " + ", ".join(_registered_conditions()),
    ),
    "condition.reward_model": optional(NOT_EMPTY),
    "condition.eval_model": optional(NOT_EMPTY),
    "condition.depth_reward_normalization": one_of("max", "min_max"),
    # data
    "data.dataset": NOT_EMPTY,
    "data.split": NOT_EMPTY,
    "data.image_column": NOT_EMPTY,
    "data.caption_column": NOT_EMPTY,
    "data.control_column": optional(NOT_EMPTY),
    "data.resolution": PIXELS,
    "data.caption_dropout": within(0, 1, "the fraction of captions replaced by the empty one"),
    "data.shuffle_buffer": at_least(1, "rows in the streaming shuffle buffer"),
    "data.num_workers": at_least(0, "decoding processes; 0 decodes inline"),
    "data.max_bad_fraction": within(0, 1, "the fraction of undecodable rows tolerated"),
    "data.max_samples": optional(at_least(1)),
    # loss
    "loss.reward_weight": at_least(0),
    "loss.reward_window": TIMESTEP_WINDOW,
    "loss.alignment_weight": at_least(0),
    "loss.alignment_window": TIMESTEP_WINDOW,
    "loss.timestep_sampling": one_of("uniform", "cubic"),
    "loss.diffusion_weighting": one_of("uniform", "v"),
    "loss.diffusion_weight_max": at_least(1, "the largest weight on the epsilon MSE before normalisation"),
    "loss.diffusion_weight": at_least(0),
    "loss.corrective_fraction": within(0, 1, "the share of in-window samples noised from another image"),
    # Below t = 200 the target's shift, sqrt(a / (1 - a)) (z_j - z_i), passes 1.75x the latents' difference (34x at
    # t = 0 on SD's schedule): the denoising term would be dominated by those samples.
    "loss.corrective_window": Range(
        lambda w: len(w) == 2 and 200 <= w[0] <= w[1] <= 999,
        "[t_min, t_max] with 200 <= t_min <= t_max <= 999 (at low t the target would be mostly the other image's "
        "difference)",
    ),
    # probe
    "probe.path": optional(NOT_EMPTY),
    "probe.timestep_input": one_of(None, "t", "step_index"),
    "probe.projection_dim": at_least(4, "its bottleneck is projection_dim // 4 channels wide"),
    "probe.output_dir": NOT_EMPTY,
    "probe.loss": one_of("mse", "balanced"),
    "probe.lr": above(0),
    "probe.weight_decay": at_least(0),
    "probe.batch_size": at_least(1, "the global batch"),
    "probe.max_steps": at_least(1),
    "probe.eval_samples": at_least(1, "held-out rows the probe is scored on"),
    "probe.collapse_std": at_least(0),
    # optim
    "optim.lr": above(0),
    "optim.weight_decay": at_least(0),
    "optim.adam_beta1": within(0, 1, open_high=True),
    "optim.adam_beta2": within(0, 1, open_high=True),
    "optim.adam_eps": above(0),
    "optim.max_grad_norm": above(0, "the gradient norm is clipped to it"),
    "optim.lr_schedule": one_of(*LR_SCHEDULES),
    "optim.warmup_steps": at_least(0),
    "optim.max_steps": at_least(1),
    "optim.batch_size": at_least(1, "the batch per process"),
    "optim.gradient_accumulation": at_least(1),
    "optim.mixed_precision": PRECISION,
    "optim.ema_decay": within(0, 1),
    "optim.optimizer": one_of("adamw", "adamw_fused", "adamw_8bit"),
    "optim.text_embedding_cache": at_least(0, "captions whose embeddings are kept; 0 = no cache"),
    "optim.latent_cache": at_least(0, "training images whose VAE latent distributions are kept; 0 = no cache"),
    "optim.zero_conv_lr_scale": above(0, "multiplies optim.lr for the zero-initialised layers"),
    # logging
    "logging.output_dir": NOT_EMPTY,
    "logging.log_every": at_least(1, "in optimizer steps"),
    "logging.checkpoint_every": at_least(1, "in optimizer steps"),
    "logging.checkpoint_total_limit": at_least(1, "checkpoints kept"),
    "logging.resume": optional(NOT_EMPTY),
    "logging.validation_every": at_least(0, "in optimizer steps; 0 = no validation grids"),
    "logging.validation_prompts": ANY,
    "logging.validation_images": ANY,
    "logging.report_to": one_of(*TRACKERS),
    # eval
    "eval.dataset": NOT_EMPTY,
    "eval.split": NOT_EMPTY,
    "eval.image_column": NOT_EMPTY,
    "eval.caption_column": NOT_EMPTY,
    "eval.control_column": optional(NOT_EMPTY),
    "eval.output_dir": NOT_EMPTY,
    "eval.resolution": PIXELS,
    "eval.num_inference_steps": at_least(1),
    "eval.guidance_scale": at_least(0, "classifier-free guidance; 1 = none"),
    "eval.negative_prompt": ANY,
    "eval.images_per_prompt": within(1, 1024),
    "eval.batch_size": at_least(1),
    "eval.seed": SEED,
    "eval.max_samples": optional(at_least(1)),
    "eval.mixed_precision": PRECISION,
    "eval.clip_model": NOT_EMPTY,
    "eval.inception_weights": optional(NOT_EMPTY),
    "eval.fid_features": one_of("inception", "clip"),
    "eval.model_kind": one_of("controlnet", "t2i_adapter"),
    "eval.scheduler": one_of("auto", "unipc", "euler_ancestral"),
    "eval.adapter_conditioning_scale": optional(at_least(0)),
    "eval.controlnet_conditioning_scale": at_least(0),
    "eval.vae": optional(NOT_EMPTY),
}


def _validate(cfg: DictConfig) -> None:
    """Every value inside its range (RANGES), checked at load time so that a bad one fails before any work."""
    for key, allowed in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if not allowed.accepts(value):
            raise ConfigError(allowed.error(key, value))


def precision_dtype(mixed_precision: str):
    """torch dtype of a mixed-precision setting ("no", "fp16", "bf16"; validated by load_config)."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def describe_schema() -> str:
    """Markdown table of every key with its default and allowed values (the README's configuration reference)."""
    defaults = OmegaConf.structured(Config)
    rows = ["| key | default | allowed |", "| --- | --- | --- |"]
    for key in valid_keys():
        value = OmegaConf.select(defaults, key)
        if isinstance(value, DictConfig) or hasattr(value, "__iter__") and not isinstance(value, str):
            value = OmegaConf.to_container(value) if not isinstance(value, str) else value
        if key in RANGES:
            allowed = RANGES[key].describe() + (f" ({RANGES[key].meaning})" if RANGES[key].meaning else "")
        else:  # a boolean
            allowed = "true or false" if value is not None else "null, true or false"
        rows.append(f"| `{key}` | `{value}` | {allowed} |")
    return "\n".join(rows)


if __name__ == "__main__":
    # python -m innercontrol.config: the configuration reference table (pasted into the README by a test check)
    print(describe_schema())
