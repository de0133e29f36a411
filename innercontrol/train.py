"""Aligned ControlNet training: InnerControl, and by config the ControlNet++ and plain ControlNet baselines.

    accelerate launch --config_file train/config.yml -m innercontrol.train --config configs/depth.yaml
    python -m innercontrol.train --config configs/tiny.yaml logging.output_dir=outputs/tiny_run  # CPU, after make demo
    python -m innercontrol.train --config configs/hed.yaml loss.alignment_weight=0   # ControlNet++ baseline
    python -m innercontrol.train --config configs/hed.yaml loss.alignment_weight=0 loss.reward_weight=0  # plain

The objective (DESIGN section 3), per micro-batch:
    loss = diffusion_mse + reward_weight * reward_loss[t in reward_window]
                         + alignment_weight * alignment_loss[t in alignment_window]
(the published method; loss.diffusion_weight and loss.diffusion_weighting are options that weigh the first term,
and loss.corrective_fraction one that noises some samples from another image of the batch: losses.corrective_noise).
Only the ControlNet is trained; UNet, VAE, text encoder, probe and condition model are frozen.
Checkpoints go to <output_dir>/checkpoints/checkpoint-<step> (resume with logging.resume=latest); the final
ControlNet and its EMA are written with save_pretrained to <output_dir>/controlnet and <output_dir>/controlnet_ema
(output_dir = logging.output_dir; probe pretraining keeps to probe.output_dir). A fresh run (logging.resume=null)
into a folder that holds another run's checkpoints, config.yaml or final model stops before writing anything;
logging.overwrite=true removes that run's outputs and starts over.
Exit codes: 0 finished; 75 (STOPPED_EXIT_CODE) stopped by Ctrl-C or SIGTERM after saving a checkpoint (resume with
logging.resume=latest); any other non-zero code: an error.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from innercontrol.checkpoints import (
    CONFIG_HISTORY,
    earlier_histories,
    prepare_fresh_start,
    record_config,
    resume,
    save_checkpoint,
    save_model_atomically,
)
from innercontrol.config import ConfigError, load_config, precision_dtype
from innercontrol.controlled_unet import ControlledUNet, tapped_channels, tapped_modules
from innercontrol.distributed import finish
from innercontrol.families import PromptEmbeddings
from innercontrol.losses import (
    LossWeights,
    corrective_noise,
    corrective_rows,
    diffusion_target,
    innercontrol_objective,
    sample_timesteps,
)
from innercontrol.models import (
    LatentCache,
    TextEmbeddingCache,
    check_vae_precision,
    encode_latents,
    load_controlnet,
    load_stable_diffusion,
)
from innercontrol.reward import SplitReward, host_to_device
from innercontrol.speed import compile_blocks, to_channels_last, uncompiled

logger = logging.getLogger("innercontrol.train")
LOSS_TERMS = ("loss", "diffusion", "reward", "alignment")
# Exit code of a run stopped on request after saving its checkpoint (EX_TEMPFAIL: not finished, resume it).
STOPPED_EXIT_CODE = 75
# With several processes, a stop request is agreed on (one small all-reduce) at least this often, in steps.
STOP_AGREEMENT_EVERY = 10
# What a run writes into logging.output_dir: a fresh run finding any of these stops (or removes them, overwrite).
RUN_OUTPUTS = (
    "checkpoints",
    "config.yaml",
    CONFIG_HISTORY,
    "controlnet",
    "controlnet_ema",
    "summary.json",
    "validation",
    "logs",
)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stops and keeps its last good checkpoint."""


def ema_decay_at(update: int, max_decay: float) -> float:
    """Decay of EMA update number `update` (1, 2, ...), the schedule of diffusers' EMAModel that the anchors use:
    with s = update - 1, 0 for s = 0 (a copy), then min((1 + s) / (10 + s), max_decay). Early updates follow the
    training instead of keeping the initial weights (a fixed 0.9999 keeps ~37% of them after 10k steps)."""
    s = update - 1
    return 0.0 if s <= 0 else min((1 + s) / (10 + s), max_decay)


class EMA:
    """Exponential moving average of the ControlNet's weights with the warm-up of ema_decay_at (saved and restored,
    update count included, with every checkpoint)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.max_decay = decay
        self.updates = 0
        self.shadow = uncompiled(copy.deepcopy(model)).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """One EMA step; returns the decay it used."""
        self.updates += 1
        decay = ema_decay_at(self.updates, self.max_decay)
        for ema_param, param in zip(self.shadow.parameters(), model.parameters()):
            ema_param.lerp_(param.detach().to(ema_param.dtype), 1 - decay)
        return decay

    def state_dict(self) -> dict:
        return {"max_decay": self.max_decay, "updates": self.updates, "weights": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "updates" not in state:
            raise ValueError(
                "this checkpoint's EMA predates the EMA warm-up (no update count): resume it with the code that wrote "
                "it, or start a new run"
            )
        self.max_decay, self.updates = state["max_decay"], state["updates"]
        self.shadow.load_state_dict(state["weights"])


class LossLog:
    """The loss terms of each micro-batch, kept on the device until read: the loop reads them back in one copy at the
    logging interval and before anything is saved or shown, so the host queues steps ahead of the device instead of
    waiting for each loss value (issue 16). Reading checks them: a non-finite term raises NonFiniteLossError naming the
    first step it appeared in. Steps after it may have updated the weights in memory, but nothing is saved after a
    bad step: the last good checkpoint stays the latest."""

    def __init__(self):
        self.pending: list[tuple[int, tuple[str, ...], torch.Tensor]] = []
        self.sums = {term: 0.0 for term in LOSS_TERMS}
        self.micro_batches = 0

    def add(self, step: int, terms: dict) -> None:
        """Queue the terms of a micro-batch of optimizer step `step` (no device read)."""
        keys = tuple(k for k in LOSS_TERMS if k in terms)
        self.pending.append((step, keys, torch.stack([terms[k].detach().float().reshape(()) for k in keys])))

    def read(self, accelerator, stop_requested: bool) -> bool:
        """Read the queued terms (one device-to-host copy), add them to the sums, raise on a non-finite one here or
        on another process; returns whether any process asked to stop (agreed across processes)."""
        pending, self.pending = self.pending, []
        host = torch.cat([values for _, _, values in pending]).cpu().tolist() if pending else []
        first_bad, position = None, 0
        for step, keys, _ in pending:
            values = dict(zip(keys, host[position : position + len(keys)]))
            position += len(keys)
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if bad and first_bad is None:
                first_bad = (step, ", ".join(f"{k}={values[k]}" for k in bad))
            for term, value in values.items():
                self.sums[term] += value
            self.micro_batches += 1
        flags = [float(first_bad is not None), float(stop_requested)]
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(torch.tensor(flags, device=accelerator.device), reduction="sum").tolist()
        if flags[0] > 0:
            step, found = first_bad or ("?", "on another process")
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({found}); the run stops without saving, so the last good "
                f"checkpoint stays the latest (resume with logging.resume=latest, perhaps with a lower optim.lr or "
                f"optim.mixed_precision=bf16)"
            )
        return flags[1] > 0

    def means(self) -> dict:
        """Mean of each term over the micro-batches read since the last call; resets the sums."""
        logs = {f"loss/{k}": v / max(1, self.micro_batches) for k, v in self.sums.items()}
        self.sums = {term: 0.0 for term in LOSS_TERMS}
        self.micro_batches = 0
        return logs


class RunStopped(Exception):
    """The run stopped on request (Ctrl-C / SIGTERM) after saving a checkpoint; main() exits with STOPPED_EXIT_CODE."""

    def __init__(self, checkpoint: Path, step: int):
        super().__init__(f"stopped at step {step} on request; checkpoint {checkpoint} (resume: logging.resume=latest)")
        self.checkpoint, self.step = checkpoint, step


class StopRequest:
    """Ctrl-C / SIGTERM: remember the request; the loop saves a checkpoint at the next step boundary and raises
    RunStopped."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: saving a checkpoint after this step (Ctrl-C again to abort)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="experiment YAML (configs/*.yaml); schema defaults if omitted")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=2e-5 loss.reward_weight=0")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return parser.parse_intermixed_args(argv)  # key=value overrides may follow options too


def compute_control(condition, images: torch.Tensor) -> torch.Tensor:
    """Control maps (B,3,H,W) in [0,1] from images in [-1,1], batched on the accelerator (hed, lineart, canny)."""
    with torch.no_grad():
        return condition((images.float() + 1) / 2).float()


# Layers diffusers' ControlNetModel (SD1.5 and SDXL alike) starts at zero: the conditioning embedding's output conv
# and the 1x1 convs that hand each residual to the UNet.
ZERO_INITIALISED = ("controlnet_cond_embedding.conv_out.", "controlnet_down_blocks.", "controlnet_mid_block.")


def parameter_groups(controlnet: torch.nn.Module, lr: float, zero_conv_lr_scale: float = 1.0):
    """The ControlNet's trainable parameters for the optimizer: one group, or with `zero_conv_lr_scale` != 1 two, the
    zero-initialised layers (ZERO_INITIALISED) at lr * zero_conv_lr_scale and the rest at lr."""
    named = [(name, param) for name, param in controlnet.named_parameters() if param.requires_grad]
    if zero_conv_lr_scale == 1.0:
        return [param for _, param in named]
    zero = [param for name, param in named if name.startswith(ZERO_INITIALISED)]
    if not zero:
        raise ConfigError(
            f"optim.zero_conv_lr_scale={zero_conv_lr_scale}: this {type(controlnet).__name__} has no zero-initialised "
            f"layers ({', '.join(ZERO_INITIALISED)}); use optim.zero_conv_lr_scale=1.0"
        )
    rest = [param for name, param in named if not name.startswith(ZERO_INITIALISED)]
    return [{"params": rest, "lr": lr}, {"params": zero, "lr": lr * zero_conv_lr_scale}]


def resume_error(err: ValueError, output_dir: Path, groups: int) -> ConfigError:
    """torch's refusal to load an optimizer state with other parameter groups, said in terms of the config."""
    saved = output_dir / "config.yaml"
    was = ""
    if saved.is_file():
        from omegaconf import OmegaConf

        was = f" (the run's {saved} has {OmegaConf.load(saved).optim.get('zero_conv_lr_scale', 1.0)})"
    return ConfigError(
        f"cannot resume from {output_dir}: its checkpoint's optimizer has other parameter groups than this config "
        f"makes ({groups}): optim.zero_conv_lr_scale splits the ControlNet into two groups when "
        f"it is not 1.0, so it cannot change between 1.0 and another value on resume. Resume with the run's "
        f"value{was}, or start a fresh run in another logging.output_dir ({err})"
    )


def build_optimizer(optim_cfg, params, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of optim.optimizer over the ControlNet's parameters, with the config's lr, betas, eps and decay."""
    kwargs = dict(
        lr=optim_cfg.lr,
        betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
        weight_decay=optim_cfg.weight_decay,
        eps=optim_cfg.adam_eps,
    )
    if optim_cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError as err:
            raise ConfigError(
                "optim.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes (or optim.optimizer=adamw)"
            ) from err
        if torch.device(device).type != "cuda":
            raise ConfigError("optim.optimizer=adamw_8bit runs on CUDA GPUs only: use optim.optimizer=adamw here")
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    if optim_cfg.optimizer == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if optim_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ConfigError(f"optim.optimizer={optim_cfg.optimizer!r}: use adamw, adamw_fused or adamw_8bit")


def training_step(
    batch,
    sd,
    model,
    condition,
    probe,
    weights: LossWeights,
    weight_dtype,
    device,
    split: SplitReward | None = None,
    encode_text: Callable[[list[str]], PromptEmbeddings] | None = None,
    timestep_sampling: str = "uniform",
    encode_images: Callable[[torch.Tensor, list], torch.Tensor] | None = None,
) -> dict:
    """One micro-batch: encode, noise, ControlNet + UNet forward with decoder taps, every term of the objective.
    encode_text (e.g. a TextEmbeddingCache) replaces encoding the captions with sd's text encoders;
    timestep_sampling: losses.sample_timesteps's scheme; encode_images (a LatentCache: images, row ids -> scaled
    latents) replaces encoding the images with sd's VAE."""
    # Pinned, non-blocking copies on CUDA: the host does not wait here for the previous step's kernels.
    images = host_to_device(batch["pixel_values"], device)
    control = host_to_device(batch["control"], device) if "control" in batch else compute_control(condition, images)
    with torch.no_grad():
        latents = encode_latents(sd.vae, images.to(weight_dtype), encode_images, batch["row_id"])
        if encode_text is not None:
            text = encode_text(batch["caption"])
        else:  # the family's conditioning (SDXL: both encoders, pooled embedding, size ids of this image size)
            text = sd.encode_prompts(batch["caption"], device, tuple(images.shape[-2:]))
    latents = latents.float()
    noise = torch.randn_like(latents)
    # Sampled on the host: the loss windows are chosen from this copy without reading the device back.
    host_timesteps = sample_timesteps(latents.shape[0], sd.scheduler.config.num_train_timesteps, timestep_sampling)
    timesteps = host_to_device(host_timesteps, device)
    if weights.corrective_fraction > 0:
        rows = corrective_rows(host_timesteps, weights.corrective_fraction, weights.corrective_window)
        noise = corrective_noise(latents, noise, timesteps, sd.scheduler.alphas_cumprod, host_to_device(rows, device))
    noisy = sd.scheduler.add_noise(latents, noise, timesteps)
    output = model(noisy.to(weight_dtype), timesteps, text.to(weight_dtype), control.to(weight_dtype))
    target = diffusion_target(sd.scheduler, latents, noise, timesteps)
    return innercontrol_objective(
        output,
        target,
        noisy,
        timesteps,
        control,
        weights,
        sd.scheduler,
        sd.vae,
        condition,
        probe,
        split,
        host_timesteps,
    )


@torch.no_grad()
def validation_grid(cfg, sd, controlnet, condition, controls, captions, device, weight_dtype):
    """One image per validation prompt; rows of (control | generated) under column labels, as a PIL image."""
    import diffusers
    from diffusers import UniPCMultistepScheduler
    from PIL import Image

    from innercontrol.report import to_pil, with_column_labels

    pipe = getattr(diffusers, sd.family.controlnet_pipeline)(
        **sd.components(),
        controlnet=controlnet,
        scheduler=UniPCMultistepScheduler.from_config(sd.scheduler.config),
        **sd.family.pipeline_options,
    )
    pipe.set_progress_bar_config(disable=True)
    size = cfg.data.resolution
    rows = []
    # The ControlNet keeps fp32 weights beside the half-precision UNet: autocast runs both in weight_dtype, as
    # training does.
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:  # training RNG untouched
        for index, (control, caption) in enumerate(zip(controls, captions)):
            image = pipe(
                caption,
                image=control[None].to(device, weight_dtype),
                num_inference_steps=cfg.eval.num_inference_steps,
                guidance_scale=cfg.eval.guidance_scale,
                height=size,
                width=size,
                generator=torch.Generator(device="cpu").manual_seed(cfg.seed + index),
                output_type="pil",
            ).images[0]
            control_image = to_pil(control)
            rows.append((control_image.resize(image.size), image))
    grid = Image.new("RGB", (2 * size, size * len(rows)))
    for row, (control_image, image) in enumerate(rows):
        grid.paste(control_image, (0, row * size))
        grid.paste(image, (size, row * size))
    return with_column_labels(grid, ["control", "generated"])


def validation_batch(cfg, condition, device):
    """Controls and captions of the validation grid: logging.validation_images, else the first data rows."""
    from innercontrol.data import build_dataloader

    prompts = list(cfg.logging.validation_prompts)
    if cfg.logging.validation_images:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        controls = []
        for path in cfg.logging.validation_images:
            image = Image.open(path).convert("RGB").resize((cfg.data.resolution,) * 2, Image.BICUBIC)
            controls.append(pil_to_tensor(image).float() / 255)
        controls = torch.stack(controls)
    else:
        loader = build_dataloader(cfg.data, max(1, len(prompts)), shuffle=False, infinite=False, num_workers=0)
        batch = next(iter(loader))
        images = batch["pixel_values"].to(device)
        controls = batch["control"] if "control" in batch else compute_control(condition, images).cpu()
        prompts = prompts or batch["caption"]
    count = min(len(prompts), len(controls))
    return controls[:count], prompts[:count]


def log_images(accelerator, grid, step: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return
    try:
        train(cfg)
    except RunStopped as stopped:
        logger.warning("%s", stopped)
        raise SystemExit(STOPPED_EXIT_CODE) from None


def finished_run(output_dir: Path) -> tuple[str, int] | None:
    """(run id, steps) of the final ControlNet in output_dir (its summary.json), None if there is none."""
    summary = output_dir / "summary.json"
    if not summary.is_file() or not (output_dir / "controlnet").is_dir():
        return None
    recorded = json.loads(summary.read_text())
    return recorded.get("run_id"), recorded.get("steps")


def train(cfg) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from innercontrol.conditions import condition_options, get_condition
    from innercontrol.data import build_dataloader
    from innercontrol.probes import load_probe

    output_dir = Path(cfg.logging.output_dir)
    accelerator = Accelerator(
        # cpu=True without CUDA: `accelerate launch --num_processes N` then runs N cooperating CPU processes (gloo).
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.optim.mixed_precision,
        gradient_accumulation_steps=cfg.optim.gradient_accumulation,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    check_vae_precision(cfg.model, cfg.optim.mixed_precision)  # before anything is written or removed
    if cfg.loss.corrective_fraction > 0 and cfg.optim.batch_size < 2:
        raise ConfigError(
            "loss.corrective_fraction > 0 noises a sample from another image of its batch, and optim.batch_size=1 "
            "(per process) has none: use optim.batch_size >= 2 (optim.gradient_accumulation keeps the global batch) "
            "or loss.corrective_fraction=0"
        )
    prepare_fresh_start(
        accelerator,
        [output_dir / name for name in RUN_OUTPUTS] + earlier_histories(output_dir),
        cfg.logging.resume,
        cfg.logging.overwrite,
        hint="choose another folder with logging.output_dir=DIR",
    )
    device = accelerator.device
    if cfg.optim.allow_tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 work (Ampere and later)
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed + accelerator.process_index)
    weight_dtype = precision_dtype(cfg.optim.mixed_precision)
    weights = LossWeights.from_config(cfg.loss)
    needs_condition = weights.reward_weight > 0 or weights.alignment_weight > 0 or cfg.data.control_column is None

    sd = load_stable_diffusion(cfg.model)
    controlnet = load_controlnet(cfg.model, sd.unet, sd.vae)
    controlnet.train()
    if cfg.model.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    if cfg.model.vae_gradient_checkpointing:
        sd.vae.enable_gradient_checkpointing()
    for module in (sd.unet, sd.vae, *sd.text_encoders):
        module.to(device, dtype=weight_dtype)
    if cfg.model.channels_last:
        to_channels_last(sd.unet, controlnet)
    condition = None
    if needs_condition:
        condition = get_condition(
            cfg.condition.name,
            cfg.condition.reward_model,
            device,
            purpose="reward",
            **condition_options(cfg.condition),
        )
        condition.to(dtype=weight_dtype if condition.model is not None else None)
    probe = None
    if weights.alignment_weight > 0:
        if cfg.probe.path is None:
            raise ConfigError(
                "loss.alignment_weight > 0 needs a pretrained probe: set probe.path (train one with "
                "train/train_probes.sh CONDITION), or loss.alignment_weight=0 for the ControlNet++ baseline"
            )
        probe = load_probe(
            cfg.probe.path, trust_pickle=cfg.probe.trust_pickle, timestep_input=cfg.probe.timestep_input
        ).requires_grad_(False)
        expected = tapped_channels(sd.unet, cfg.model.tap)
        if list(probe.config.feature_dims) != expected:
            raise ConfigError(
                f"probe '{cfg.probe.path}' expects tapped channels {list(probe.config.feature_dims)}, but model.tap="
                f"{cfg.model.tap} on this UNet gives {expected}: use a probe trained for this model and tap mode"
            )
        probe.to(device, dtype=weight_dtype)
    split = None
    if weights.reward_weight > 0:
        split = SplitReward(
            sd.vae,
            condition,
            cuda_graph=cfg.model.reward_cuda_graph,
            max_chunk=cfg.model.reward_cuda_graph_max_chunk,
            scaler=accelerator.scaler,
        )

    if cfg.model.compile:
        taps = tapped_modules(sd.unet, cfg.model.tap) if probe is not None else []
        compiled = compile_blocks(sd.unet, keep_eager=taps) + compile_blocks(controlnet)
        logger.info("model.compile: %d UNet and ControlNet blocks compiled (regional torch.compile)", compiled)
    optimizer = build_optimizer(
        cfg.optim, parameter_groups(controlnet, cfg.optim.lr, cfg.optim.zero_conv_lr_scale), device
    )
    encode_text = None
    if cfg.optim.text_embedding_cache > 0:
        size = (cfg.data.resolution, cfg.data.resolution)
        encode_text = TextEmbeddingCache(
            lambda captions: sd.encode_prompts(captions, device, size), cfg.optim.text_embedding_cache
        )
    encode_images = LatentCache(sd.vae, cfg.optim.latent_cache) if cfg.optim.latent_cache > 0 else None
    # Prepared schedulers step once per process per optimizer step; scale the horizon to match.
    lr_scheduler = get_scheduler(
        cfg.optim.lr_schedule,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.optim.max_steps * accelerator.num_processes,
    )
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    ema = EMA(accelerator.unwrap_model(controlnet), cfg.optim.ema_decay) if cfg.optim.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    model = ControlledUNet(
        sd.unet,
        controlnet,
        tap=cfg.model.tap if probe is not None else None,
        probe_timesteps=probe.probe_timesteps if probe is not None else None,
    )
    loader = build_dataloader(
        cfg.data,
        cfg.optim.batch_size,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        seed=cfg.seed,
    )

    try:
        run = resume(accelerator, "train", output_dir, cfg.logging.resume, loader, optimizer, lr_scheduler)
    except ValueError as err:
        if "parameter group" not in str(err):
            raise
        raise resume_error(err, output_dir, len(optimizer.param_groups)) from err
    global_step = run.step
    if run.checkpoint is not None:
        logger.info("resumed run %s from %s at step %d", run.run_id, run.checkpoint, global_step)
        if ema is not None and ema.max_decay != cfg.optim.ema_decay:  # the checkpoint restored its own
            logger.info(
                "this config's EMA decay replaces the checkpoint's: %g -> %g", ema.max_decay, cfg.optim.ema_decay
            )
            ema.max_decay = cfg.optim.ema_decay
        if global_step >= cfg.optim.max_steps and finished_run(output_dir) == (run.run_id, global_step):
            logger.info(
                "nothing to do: %s is already at step %d >= optim.max_steps=%d and %s holds its final ControlNet "
                "(raise optim.max_steps to train further)",
                run.checkpoint,
                global_step,
                cfg.optim.max_steps,
                output_dir / "controlnet",
            )
            finish(accelerator)
            return output_dir
    elif cfg.logging.resume == "latest":
        logger.info("logging.resume=latest: no checkpoint in %s yet, starting fresh", output_dir)

    if accelerator.is_main_process:
        record_config(output_dir, cfg, global_step, resumed=run.checkpoint is not None)
        if cfg.logging.report_to != "none":
            accelerator.init_trackers("innercontrol")
        validation = validation_batch(cfg, condition, device) if cfg.logging.validation_every > 0 else None
    stop = StopRequest()
    logger.info("training from step %d to %d (Ctrl-C saves a checkpoint and stops)", global_step, cfg.optim.max_steps)
    data = iter(loader)
    progress = tqdm(
        total=cfg.optim.max_steps, initial=global_step, disable=not accelerator.is_main_process, desc="steps"
    )
    losses, window_start, window_steps = LossLog(), time.perf_counter(), 0

    def checkpoint_now(reason: str) -> Path:
        extra = {"reason": reason, "config": cfg.logging.output_dir}
        path = save_checkpoint(
            accelerator, output_dir, run, global_step, loader.state_dict(), extra, cfg.logging.checkpoint_total_limit
        )
        logger.info("checkpoint (%s): %s", reason, path)
        return path

    try:
        while global_step < cfg.optim.max_steps:
            batch = next(data)
            with accelerator.accumulate(controlnet):
                terms = training_step(
                    batch,
                    sd,
                    model,
                    condition,
                    probe,
                    weights,
                    weight_dtype,
                    device,
                    split,
                    encode_text,
                    cfg.loss.timestep_sampling,
                    encode_images,
                )
                losses.add(global_step + 1, terms)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            window_steps += 1
            progress.update(1)
            if ema is not None:
                ema.update(accelerator.unwrap_model(controlnet))
            log_now = global_step % cfg.logging.log_every == 0 or global_step == cfg.optim.max_steps
            checkpoint_due = global_step % cfg.logging.checkpoint_every == 0
            validation_due = cfg.logging.validation_every > 0 and global_step % cfg.logging.validation_every == 0
            # One process reads its own stop request at every step; several agree on it where they read the losses,
            # and at least every STOP_AGREEMENT_EVERY steps.
            single_stop = accelerator.num_processes == 1 and stop.requested
            agree = accelerator.num_processes > 1 and global_step % STOP_AGREEMENT_EVERY == 0
            if not (log_now or checkpoint_due or validation_due or single_stop or agree):
                continue
            stop_now = losses.read(accelerator, stop.requested)  # raises on a non-finite loss: nothing is saved
            if log_now:
                elapsed = time.perf_counter() - window_start
                logs = losses.means()
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                logs["steps_per_sec"] = window_steps / elapsed
                accelerator.log(logs, step=global_step)
                progress.set_postfix(loss=f"{logs['loss/loss']:.4f}", steps_s=f"{logs['steps_per_sec']:.2f}")
                window_start, window_steps = time.perf_counter(), 0
            if stop_now:
                stopped_at = checkpoint_now("stop requested")
                finish(accelerator)
                raise RunStopped(stopped_at, global_step)
            if checkpoint_due:
                checkpoint_now("interval")
            if validation_due:
                if accelerator.is_main_process:
                    net = ema.shadow if ema is not None else accelerator.unwrap_model(controlnet)
                    grid = validation_grid(cfg, sd, net, condition, *validation, device, weight_dtype)
                    folder = output_dir / "validation"
                    folder.mkdir(exist_ok=True)
                    grid.save(folder / f"step-{global_step:06d}.png")
                    log_images(accelerator, grid, global_step)
                accelerator.wait_for_everyone()
    finally:
        stop.restore()
        progress.close()

    accelerator.wait_for_everyone()
    if global_step % cfg.logging.checkpoint_every != 0:
        checkpoint_now("final")
    if accelerator.is_main_process:
        save_model_atomically(accelerator.unwrap_model(controlnet), output_dir / "controlnet")
        if ema is not None:
            save_model_atomically(ema.shadow, output_dir / "controlnet_ema")
        summary = {
            "run_id": run.run_id,
            "steps": global_step,
            "controlnet": str(output_dir / "controlnet"),
            "data": vars(loader.stats),
        }
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        logger.info("final ControlNet: %s (EMA: %s)", output_dir / "controlnet", output_dir / "controlnet_ema")
    finish(accelerator)
    return output_dir


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)
