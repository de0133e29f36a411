"""Probe pretraining: teach the aggregation network to read the control map from the frozen UNet's decoder.

    accelerate launch -m innercontrol.train_probes --config configs/probe_depth.yaml
    python -m innercontrol.train_probes --config configs/tiny.yaml probe.max_steps=300   # CPU, after `make demo`

Frozen SD (and, with probe.use_controlnet=true, the frozen model.controlnet); t uniform over the whole schedule;
one UNet pass per sample (the empty prompt by default, as Readout Guidance); loss between the probe's map mapped
to [0,1] and the control resized to the probe's resolution: MSE, or for sparse edge maps the balanced loss
(mean over background pixels and mean over foreground pixels, averaged), which keeps the probe from collapsing
to a constant map. The real t is embedded everywhere (training and use).

Writes the probe to probe.path (ControlProbe.save_pretrained) together with probe_accuracy.{md,json,png}: the
error of the probe against the control in timestep buckets over 0-999 on held-out data (the eval.* dataset),
next to the error of predicting the mean control map. A collapsed probe (held-out outputs barely vary) is not
saved to probe.path but to <probe.path>.collapsed, and the run fails with an error saying so.
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

from innercontrol.checkpoints import resume, save_checkpoint
from innercontrol.config import load_config, precision_dtype
from innercontrol.controlled_unet import ControlledUNet, tapped_channels
from innercontrol.distributed import finish
from innercontrol.models import encode_prompts, load_controlnet, load_stable_diffusion
from innercontrol.train import compute_control

logger = logging.getLogger("innercontrol.train_probes")
BUCKETS = [(start, start + 99) for start in range(0, 1000, 100)]


class CollapsedProbeError(RuntimeError):
    """The trained probe outputs (almost) the same map for every input."""


def balanced_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over edge pixels and over background pixels, averaged (edges: target > 0.5)."""
    foreground = (target.mean(dim=1, keepdim=True) > 0.5).expand_as(target)
    errors = (prediction - target).pow(2)
    parts = [errors[mask].mean() for mask in (foreground, ~foreground) if mask.any()]
    return sum(parts) / len(parts)


def probe_loss(kind: str, prediction01: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return balanced_mse(prediction01, target) if kind == "balanced" else F.mse_loss(prediction01, target)


def features_at(model, sd, batch_images, control, timesteps, text, noise_seed=None):
    """Noise the images' latents to t and run the frozen model once; returns its ControlledOutput."""
    with torch.no_grad():
        latents = sd.vae.encode(batch_images).latent_dist.sample() * sd.vae.config.scaling_factor
        generator = None if noise_seed is None else torch.Generator(device="cpu").manual_seed(noise_seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        noisy = sd.scheduler.add_noise(latents, noise, timesteps)
        return model(noisy, timesteps, text, control.to(noisy.dtype))


def resize_to(control: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(control.float(), size=tuple(size), mode="area")


@torch.no_grad()
def accuracy_by_timestep(cfg, sd, model, probe, condition, held_out, mean_label, text, device, dtype) -> list[dict]:
    """Alignment-space MSE of the probe and of the mean control map, per timestep bucket, on held-out samples."""
    rows = []
    images, controls = held_out
    for bucket, (low, high) in enumerate(BUCKETS):
        generator = torch.Generator().manual_seed(cfg.seed + bucket)
        timesteps = torch.randint(low, high + 1, (len(images),), generator=generator).to(device)
        out = features_at(
            model,
            sd,
            images.to(device, dtype),
            controls.to(device),
            timesteps,
            text.expand(len(images), -1, -1),
            noise_seed=cfg.seed + 1000 + bucket,
        )
        prediction = probe(out.features, out.time_embedding).float()
        label = condition.normalize_label(resize_to(controls.to(device), prediction.shape[-2:]))
        predicted = condition.normalize_probe_output((prediction + 1) / 2)
        probe_error = (predicted - label).pow(2).flatten(1).mean(1)
        mean_error = (mean_label.to(device) - label).pow(2).flatten(1).mean(1)
        rows.append(
            {
                "t_low": low,
                "t_high": high,
                "probe_mse": probe_error.mean().item(),
                "mean_map_mse": mean_error.mean().item(),
                "output_std": prediction.std(dim=0).mean().item(),
            }
        )
    return rows


def write_accuracy_report(folder: Path, rows: list[dict], header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        header,
        "",
        "| t | probe MSE | mean-map MSE | probe / mean | beats mean map |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ratio = r["probe_mse"] / max(r["mean_map_mse"], 1e-12)
        lines.append(
            f"| {r['t_low']}-{r['t_high']} | {r['probe_mse']:.5f} | {r['mean_map_mse']:.5f} | {ratio:.3f} | "
            f"{'yes' if r['probe_mse'] < r['mean_map_mse'] else 'no'} |"
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
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    train_probe(load_config(args.config, args.overrides))


def train_probe(cfg) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from innercontrol.conditions import get_condition
    from innercontrol.data import build_dataloader
    from innercontrol.probes import build_probe

    if cfg.probe.path is None:
        raise ValueError("set probe.path: the folder the trained probe is written to (e.g. checkpoints/probes/depth)")
    output_dir = Path(cfg.logging.output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.optim.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    device = accelerator.device
    set_seed(cfg.seed + accelerator.process_index)
    dtype = precision_dtype(cfg.optim.mixed_precision)

    sd = load_stable_diffusion(cfg.model)
    controlnet = load_controlnet(cfg.model, sd.unet).requires_grad_(False).eval() if cfg.probe.use_controlnet else None
    for module in (sd.unet, sd.vae, sd.text_encoder, controlnet):
        if module is not None:
            module.to(device, dtype=dtype)
    model = ControlledUNet(sd.unet, controlnet, tap=cfg.model.tap)
    condition = get_condition(cfg.condition.name, cfg.condition.reward_model, device, purpose="reward")
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
        cfg.data, cfg.probe.batch_size, accelerator.process_index, accelerator.num_processes, seed=cfg.seed
    )
    step, _ = resume(accelerator, output_dir, cfg.logging.resume, loader)

    empty = encode_prompts(sd.tokenizer, sd.text_encoder, [""], device).to(dtype)
    label_sum, label_count = None, 0
    data = iter(loader)
    progress = tqdm(total=cfg.probe.max_steps, initial=step, disable=not accelerator.is_main_process, desc="probe")
    while step < cfg.probe.max_steps:
        batch = next(data)
        images = batch["pixel_values"].to(device, dtype)
        control = batch["control"].to(device) if "control" in batch else compute_control(condition, images)
        if cfg.probe.empty_prompt:
            text = empty.expand(len(images), -1, -1)
        else:
            text = encode_prompts(sd.tokenizer, sd.text_encoder, batch["caption"], device).to(dtype)
        timesteps = torch.randint(0, sd.scheduler.config.num_train_timesteps, (len(images),), device=device)
        out = features_at(model, sd, images, control, timesteps, text)
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
            save_checkpoint(accelerator, output_dir, step, loader.state_dict(), {}, cfg.logging.checkpoint_total_limit)
    progress.close()

    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            return report_and_save(
                cfg, accelerator, sd, model, probe, condition, step, label_sum, label_count, empty, dtype
            )
        return Path(cfg.probe.path)
    finally:
        finish(accelerator)


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
    target = Path(cfg.probe.path if not collapsed else f"{cfg.probe.path}.collapsed")
    probe.config.extra.update({"steps": step, "loss": cfg.probe.loss, "held_out_output_std": output_std})
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
            f"probe.loss=balanced; else train longer or lower probe.lr"
        )
    print(f"probe written to {target}; accuracy table {target / 'probe_accuracy.md'}")
    return target


if __name__ == "__main__":
    main()
