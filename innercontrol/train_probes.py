"""Probe pretraining: teach the aggregation network to read the control map from the frozen UNet's decoder.

    accelerate launch -m innercontrol.train_probes --config configs/probe_depth.yaml
    python -m innercontrol.train_probes --config configs/tiny.yaml probe.max_steps=300 \
        probe.path=outputs/tiny_probe probe.output_dir=outputs/tiny_probe_run    # CPU, after `make demo`

Frozen SD (and, with probe.use_controlnet=true, the frozen model.controlnet); t uniform over the whole schedule;
one UNet pass per sample (the empty prompt by default, as Readout Guidance); loss between the probe's map mapped
to [0,1] and the control resized to the probe's resolution: MSE, or for sparse edge maps the balanced loss
(mean over background pixels and mean over foreground pixels, averaged), which keeps the probe from collapsing
to a constant map. The real t is embedded everywhere (training and use).

Writes the probe to probe.path (ControlProbe.save_pretrained) together with probe_accuracy.{md,json,png}: the
error of the probe against the control in timestep buckets over 0-999 on held-out data (the eval.* dataset),
next to the error of predicting the mean control map, with the paired difference and its standard error. A
collapsed probe (held-out outputs barely vary) is not saved to probe.path but to <probe.path>.collapsed, and one that
is worse than the mean map by more than 2 standard errors over all timesteps to <probe.path>.failed; either way the
run fails with an error saying so.
Checkpoints and config.yaml go to probe.output_dir (never ControlNet training's logging.output_dir; resume with
logging.resume=latest). A fresh run where probe.output_dir or probe.path already holds another run's checkpoints,
config.yaml or probe stops before writing anything; logging.overwrite=true removes those and starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from innercontrol.checkpoints import (
    CONFIG_HISTORY,
    earlier_histories,
    prepare_fresh_start,
    record_config,
    resume,
    save_checkpoint,
)
from innercontrol.config import ConfigError, load_config, precision_dtype
from innercontrol.controlled_unet import ControlledUNet, tapped_channels
from innercontrol.distributed import finish
from innercontrol.models import (
    LatentCache,
    check_vae_precision,
    encode_latents,
    load_controlnet,
    load_stable_diffusion,
)
from innercontrol.probes import CONFIG_NAME, WEIGHTS_NAME
from innercontrol.train import compute_control

logger = logging.getLogger("innercontrol.train_probes")
# What a run writes into probe.output_dir and into probe.path (plus <probe.path>.collapsed / .failed).
RUN_OUTPUTS = ("checkpoints", "config.yaml", CONFIG_HISTORY)
PROBE_OUTPUTS = (CONFIG_NAME, WEIGHTS_NAME, "probe_accuracy.md", "probe_accuracy.json", "probe_accuracy.png")
BUCKETS = [(start, start + 99) for start in range(0, 1000, 100)]


# Differences within this many standard errors of their paired per-sample differences are reported as ties.
TIE_SE = 2.0


class FailedProbeError(RuntimeError):
    """The trained probe is not usable (worse than the mean control map); it is saved aside, not to probe.path."""


class CollapsedProbeError(FailedProbeError):
    """The trained probe outputs (almost) the same map for every input."""


def per_process_batch(global_batch: int, num_processes: int) -> int:
    """probe.batch_size is the global batch (Readout Guidance: 8 on one device), split evenly over the processes."""
    if global_batch % num_processes:
        raise ConfigError(
            f"probe.batch_size={global_batch} is the global batch and must divide evenly over the {num_processes} "
            f"processes: use a multiple of {num_processes} or launch with --num_processes dividing it"
        )
    return global_batch // num_processes


def balanced_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over edge pixels and over background pixels, averaged (edges: target > 0.5)."""
    foreground = (target.mean(dim=1, keepdim=True) > 0.5).expand_as(target)
    errors = (prediction - target).pow(2)
    parts = [errors[mask].mean() for mask in (foreground, ~foreground) if mask.any()]
    return sum(parts) / len(parts)


def probe_loss(kind: str, prediction01: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return balanced_mse(prediction01, target) if kind == "balanced" else F.mse_loss(prediction01, target)


def features_at(model, sd, batch_images, control, timesteps, text, noise_seed=None, encode_images=None, row_ids=None):
    """Noise the images' latents to t and run the frozen model once; returns its ControlledOutput. encode_images (a
    LatentCache, given the images' row_ids) replaces encoding the images with sd's VAE."""
    with torch.no_grad():
        latents = encode_latents(sd.vae, batch_images, encode_images, row_ids)
        generator = None if noise_seed is None else torch.Generator(device="cpu").manual_seed(noise_seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        noisy = sd.scheduler.add_noise(latents, noise, timesteps)
        return model(noisy, timesteps, text, control.to(noisy.dtype))


def resize_to(control: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(control.float(), size=tuple(size), mode="area")


@torch.no_grad()
def accuracy_by_timestep(cfg, sd, model, probe, condition, held_out, mean_label, text, device, dtype) -> list[dict]:
    """Alignment-space MSE of the probe and of the mean control map, per timestep bucket, on held-out samples.

    Each row also keeps the per-sample differences (probe - mean map), in held-out order, for the paired margin.
    """
    rows = []
    images, controls = held_out
    encode_once = LatentCache(sd.vae, len(images))  # the same images in every bucket: encoded once, sampled anew
    for bucket, (low, high) in enumerate(BUCKETS):
        generator = torch.Generator().manual_seed(cfg.seed + bucket)
        timesteps = torch.randint(low, high + 1, (len(images),), generator=generator).to(device)
        out = features_at(
            model,
            sd,
            images.to(device, dtype),
            controls.to(device),
            timesteps,
            text.expand(len(images)),
            noise_seed=cfg.seed + 1000 + bucket,
            encode_images=encode_once,
            row_ids=list(range(len(images))),
        )
        prediction = probe(out.features, out.time_embedding).float()
        label = condition.normalize_label(resize_to(controls.to(device), prediction.shape[-2:]))
        predicted = condition.normalize_probe_output((prediction + 1) / 2)
        probe_error = (predicted - label).pow(2).flatten(1).mean(1)
        mean_error = (mean_label.to(device) - label).pow(2).flatten(1).mean(1)
        differences = (probe_error - mean_error).tolist()
        difference, difference_se = paired_margin(differences)
        rows.append(
            {
                "t_low": low,
                "t_high": high,
                "probe_mse": probe_error.mean().item(),
                "mean_map_mse": mean_error.mean().item(),
                "difference": difference,
                "difference_se": difference_se,
                "output_std": prediction.std(dim=0).mean().item(),
                "per_sample_difference": differences,
            }
        )
    return rows


def paired_margin(differences: list[float]) -> tuple[float, float]:
    """Mean of per-sample differences and its standard error (inf with fewer than two samples)."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, math.inf
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return mean, math.sqrt(variance / n)


def beats_mean_map(difference: float, se: float) -> str:
    """'yes' / 'no' when probe - mean map is beyond TIE_SE standard errors, else 'tie'."""
    if difference < -TIE_SE * se:
        return "yes"
    return "no" if difference > TIE_SE * se else "tie"


def overall_margin(rows: list[dict]) -> tuple[float, float]:
    """Paired margin over all buckets: each held-out sample's difference averaged over the buckets first."""
    per_sample = [sum(values) / len(values) for values in zip(*(r["per_sample_difference"] for r in rows))]
    return paired_margin(per_sample)


def write_accuracy_report(folder: Path, rows: list[dict], header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        header,
        "",
        f"probe - mean: mean per-sample difference of the MSEs (paired) +- its standard error; a difference within "
        f"{TIE_SE:g} standard errors is a tie. The overall row averages each sample's difference over the buckets "
        "first.",
        "",
        "| t | probe MSE | mean-map MSE | probe / mean | probe - mean (+- SE) | beats mean map |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    difference, se = overall_margin(rows)
    overall = {
        "t_low": rows[0]["t_low"],
        "t_high": rows[-1]["t_high"],
        "probe_mse": sum(r["probe_mse"] for r in rows) / len(rows),
        "mean_map_mse": sum(r["mean_map_mse"] for r in rows) / len(rows),
        "difference": difference,
        "difference_se": se,
    }
    for r in [*rows, overall]:
        ratio = r["probe_mse"] / max(r["mean_map_mse"], 1e-12)
        verdict = beats_mean_map(r["difference"], r["difference_se"])
        name = f"{r['t_low']}-{r['t_high']}" if r is not overall else f"**all ({r['t_low']}-{r['t_high']})**"
        lines.append(
            f"| {name} | {r['probe_mse']:.5f} | {r['mean_map_mse']:.5f} | {ratio:.3f} | "
            f"{r['difference']:+.5f} +- {r['difference_se']:.5f} | {verdict} |"
        )
    (folder / "probe_accuracy.md").write_text("\n".join(lines) + "\n")
    (folder / "probe_accuracy.json").write_text(json.dumps(rows, indent=2))
    centers = [(r["t_low"] + r["t_high"]) / 2 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(centers, [r["probe_mse"] for r in rows], "o-", label="probe")
    ax.plot(centers, [r["mean_map_mse"] for r in rows], "s--", label="mean control map")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("MSE vs control (alignment space)")
    ax.set_title("probe accuracy vs timestep (held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "probe_accuracy.png", dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="experiment YAML (configs/probe_*.yaml or configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. probe.max_steps=1000")
    return parser.parse_intermixed_args(argv)  # key=value overrides may follow options too


def main(argv=None) -> None:
    args = parse_args(argv)
    train_probe(load_config(args.config, args.overrides))


def train_probe(cfg) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from innercontrol.conditions import condition_options, get_condition
    from innercontrol.data import build_dataloader
    from innercontrol.probes import build_probe

    if cfg.probe.path is None:
        raise ConfigError("set probe.path: the folder the trained probe is written to (e.g. checkpoints/probes/depth)")
    output_dir, probe_dir = Path(cfg.probe.output_dir), Path(cfg.probe.path)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.optim.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    check_vae_precision(cfg.model, cfg.optim.mixed_precision)  # before anything is written or removed
    prepare_fresh_start(
        accelerator,
        [output_dir / name for name in RUN_OUTPUTS]
        + earlier_histories(output_dir)
        + [probe_dir / name for name in PROBE_OUTPUTS]
        + [Path(f"{probe_dir}.{aside}") for aside in ("collapsed", "failed")],
        cfg.logging.resume,
        cfg.logging.overwrite,
        hint="choose other folders with probe.output_dir=DIR probe.path=DIR",
    )
    device = accelerator.device
    set_seed(cfg.seed + accelerator.process_index)
    dtype = precision_dtype(cfg.optim.mixed_precision)

    sd = load_stable_diffusion(cfg.model)
    controlnet = (
        load_controlnet(cfg.model, sd.unet, sd.vae).requires_grad_(False).eval() if cfg.probe.use_controlnet else None
    )
    for module in (sd.unet, sd.vae, *sd.text_encoders, controlnet):
        if module is not None:
            module.to(device, dtype=dtype)
    model = ControlledUNet(sd.unet, controlnet, tap=cfg.model.tap)
    condition = get_condition(
        cfg.condition.name, cfg.condition.reward_model, device, purpose="reward", **condition_options(cfg.condition)
    )
    if condition.model is not None:
        condition.to(dtype=dtype)
    probe = build_probe(
        tapped_channels(sd.unet, cfg.model.tap),
        cfg.probe.projection_dim,
        sd.unet.config.block_out_channels[0] * 4,
        tap=cfg.model.tap,
        condition=cfg.condition.name,
    )
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.probe.lr, weight_decay=cfg.probe.weight_decay)
    probe, optimizer = accelerator.prepare(probe, optimizer)
    loader = build_dataloader(
        cfg.data,
        per_process_batch(cfg.probe.batch_size, accelerator.num_processes),
        accelerator.process_index,
        accelerator.num_processes,
        seed=cfg.seed,
    )
    run = resume(accelerator, "train_probes", output_dir, cfg.logging.resume, loader, optimizer)
    step = run.step
    if run.checkpoint is not None and step >= cfg.probe.max_steps and finished_probe(probe_dir) == (run.run_id, step):
        logger.info(
            "nothing to do: %s is already at step %d >= probe.max_steps=%d and %s holds its probe",
            run.checkpoint,
            step,
            cfg.probe.max_steps,
            probe_dir,
        )
        finish(accelerator)
        return probe_dir
    if accelerator.is_main_process:
        record_config(output_dir, cfg, step, resumed=run.checkpoint is not None)

    size = (cfg.data.resolution, cfg.data.resolution)
    encode_images = LatentCache(sd.vae, cfg.optim.latent_cache) if cfg.optim.latent_cache > 0 else None
    empty = sd.encode_prompts([""], device, size).to(dtype)
    label_sum, label_count = None, 0
    data = iter(loader)
    progress = tqdm(total=cfg.probe.max_steps, initial=step, disable=not accelerator.is_main_process, desc="probe")
    while step < cfg.probe.max_steps:
        batch = next(data)
        images = batch["pixel_values"].to(device, dtype)
        control = batch["control"].to(device) if "control" in batch else compute_control(condition, images)
        if cfg.probe.empty_prompt:
            text = empty.expand(len(images))
        else:
            text = sd.encode_prompts(batch["caption"], device, tuple(images.shape[-2:])).to(dtype)
        timesteps = torch.randint(0, sd.scheduler.config.num_train_timesteps, (len(images),), device=device)
        out = features_at(model, sd, images, control, timesteps, text, None, encode_images, batch["row_id"])
        with accelerator.autocast():
            prediction = probe(out.features, out.time_embedding).float()
        target = resize_to(control, prediction.shape[-2:])
        loss = probe_loss(cfg.probe.loss, (prediction + 1) / 2, target)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite probe loss at step {step + 1}; lower probe.lr")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # running mean of the (alignment-space) label: the mean-map baseline
            label = condition.normalize_label(target).sum(0, keepdim=True)
            label_sum = label if label_sum is None else label_sum + label
            label_count += len(target)
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.logging.log_every == 0:
            logger.info("step %d loss %.5f", step, loss.item())
        if step % cfg.logging.checkpoint_every == 0:
            save_checkpoint(
                accelerator, output_dir, run, step, loader.state_dict(), {}, cfg.logging.checkpoint_total_limit
            )
    progress.close()

    accelerator.wait_for_everyone()
    accelerator.unwrap_model(probe).config.extra["run_id"] = run.run_id  # saved with the probe: which run made it
    try:
        if accelerator.is_main_process:
            return report_and_save(
                cfg, accelerator, sd, model, probe, condition, step, label_sum, label_count, empty, dtype
            )
        return Path(cfg.probe.path)
    finally:
        finish(accelerator)


def finished_probe(probe_dir: Path) -> tuple[str, int] | None:
    """(run id, steps) recorded in the probe at probe_dir, None if there is none."""
    config = probe_dir / CONFIG_NAME
    if not config.is_file() or not (probe_dir / WEIGHTS_NAME).is_file():
        return None
    extra = json.loads(config.read_text()).get("extra", {})
    return extra.get("run_id"), extra.get("steps")


def report_and_save(cfg, accelerator, sd, model, probe, condition, step, label_sum, label_count, empty, dtype) -> Path:
    """Main process: accuracy vs timestep on held-out data, collapse check, then save the probe and its report."""
    from omegaconf import OmegaConf

    from innercontrol.data import build_dataloader

    device = accelerator.device
    probe = accelerator.unwrap_model(probe).eval()
    # Held-out rows: the eval set, up to probe.eval_samples of them (eval.max_samples bounds generation only).
    held_out_cfg = OmegaConf.merge(cfg.eval, {"max_samples": cfg.probe.eval_samples})
    held = build_dataloader(
        held_out_cfg, cfg.probe.eval_samples, shuffle=False, infinite=False, num_workers=0, config_key="eval"
    )
    held_batch = next(iter(held))
    held_images = held_batch["pixel_values"]
    held_controls = (
        held_batch["control"]
        if "control" in held_batch
        else compute_control(condition, held_images.to(device, dtype)).cpu()
    )
    mean_label = label_sum / max(label_count, 1) if label_sum is not None else None
    if mean_label is None:  # resumed after the last step: estimate the mean map from the held-out labels
        raise RuntimeError("no training step ran in this invocation; raise probe.max_steps to train further")
    rows = accuracy_by_timestep(
        cfg, sd, model, probe, condition, (held_images, held_controls), mean_label, empty, device, dtype
    )
    output_std = sum(r["output_std"] for r in rows) / len(rows)
    collapsed = output_std < cfg.probe.collapse_std
    difference, difference_se = overall_margin(rows)
    verdict = beats_mean_map(difference, difference_se)
    # A collapsed probe, or one worse than the mean control map beyond noise, is saved aside, never to probe.path.
    # A tie passes with a warning: the tiny demo's probe beats the mean map at small t and ties or loses at large t.
    failed = verdict == "no"
    suffix = ".collapsed" if collapsed else ".failed" if failed else ""
    target = Path(f"{cfg.probe.path}{suffix}")
    probe.config.extra.update(
        {
            "steps": step,
            "loss": cfg.probe.loss,
            "held_out_output_std": output_std,
            "beats_mean_map": verdict,
            "difference_vs_mean_map": difference,
            "difference_se": difference_se,
        }
    )
    probe.save_pretrained(target)
    command = " ".join(["python -m innercontrol.train_probes", *sys.argv[1:]])
    header = (
        f"Made by `{command}`.\n\n"
        f"Probe accuracy vs timestep: condition {cfg.condition.name}, tap {cfg.model.tap}, {step} steps, "
        f"loss {cfg.probe.loss}, {len(held_images)} held-out samples of {held_out_cfg.dataset} "
        f"({held_out_cfg.split}); mean-map baseline = mean label over {label_count} training samples seen."
    )
    write_accuracy_report(target, rows, header)
    if collapsed:
        raise CollapsedProbeError(
            f"the probe collapsed: its held-out outputs vary by {output_std:.4f} on average (probe.collapse_std="
            f"{cfg.probe.collapse_std}); saved to {target} for inspection, not to {cfg.probe.path}. For edge maps use "
            f"probe.loss=balanced; else train longer or lower probe.lr (with logging.overwrite=true to start over)"
        )
    margin = (
        f"MSE difference {difference:+.5f} +- {difference_se:.5f} over {len(held_images)} held-out samples, all "
        f"timesteps; see {target / 'probe_accuracy.md'}"
    )
    if failed:
        raise FailedProbeError(
            f"the probe failed: it is worse than predicting the mean control map ({margin}); saved to {target} for "
            f"inspection, not to {cfg.probe.path}. Train longer (probe.max_steps) or change probe.lr, with "
            "logging.overwrite=true to start over"
        )
    if verdict == "tie":
        logger.warning(
            "the probe does not beat the mean control map beyond %g standard errors overall (%s): a tie, not a "
            "win; the table shows where in t it helps",
            TIE_SE,
            margin,
        )
    print(f"probe written to {target}; accuracy table {target / 'probe_accuracy.md'}")
    return target


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    run_cli(main)
