"""Evaluation (DESIGN section 6): generate with a ControlNet on the eval set, score controllability, CLIP score, FID.

    # 8 GPUs, depth, published protocol (UniPC, 20 steps, guidance 7.5, 4 images per prompt, 512 px, fp16):
    accelerate launch --num_processes 8 -m innercontrol.evaluate --config configs/depth.yaml \\
        --controlnet lllyasviel/control_v11f1p_sd15_depth
    # our trained ControlNet at guidance 3.0, CLIP score only (images already on disk are reused):
    accelerate launch -m innercontrol.evaluate --config configs/hed.yaml --controlnet outputs/aligned_hed/controlnet \\
        --metrics clip eval.guidance_scale=3.0 eval.output_dir=outputs/eval_hed_g3
    # the shell recipes (thin wrappers of the above): eval/eval_depth.sh, eval_hed.sh, eval_linedrawing.sh, ...
    NUM_PROCESSES=8 eval/eval_depth.sh CONTROLNET model.pretrained_model=DIR eval.dataset=DIR eval.output_dir=DIR
    # probe readout: the probe's error against the input control at each sampling step
    accelerate launch -m innercontrol.evaluate --config configs/depth.yaml --controlnet DIR --probe checkpoints/probes/depth
    # the floor: the base model alone (no ControlNet) on the same prompts, controls and seeds
    python -m innercontrol.evaluate --config configs/mini.yaml --controlnet none eval.output_dir=outputs/eval_floor
    # a T2I-Adapter baseline (published settings: Euler ancestral sampler; line-art adapter at scale 0.5)
    accelerate launch -m innercontrol.evaluate --config configs/depth.yaml --controlnet TencentARC/t2iadapter_depth_sd15v2 \\
        eval.model_kind=t2i_adapter eval.output_dir=outputs/eval_t2i_depth
    # CPU-sized and offline (after `python -m innercontrol.demo`); FID needs eval.inception_weights=FILE offline:
    python -m innercontrol.evaluate --config configs/tiny.yaml --controlnet outputs/demo/tiny/controlnet \\
        --metrics control,clip

Writes to eval.output_dir: real/{index}.png (the eval images at eval.resolution), controls/{index}.png (the controls
fed to the ControlNet), images/group_{g}/{index}.png, metrics.json, report.md, per_sample.csv, grid.png.
With the control metric and a control column in the eval set, metrics.json also holds real_images_<metric>: the
condition model's score of the real eval images against their own controls, the ceiling a generated image can reach
under this evaluator (not computed for canny, whose label is the real image's own edges).
Image (index, g) is generated from the seed (eval.seed * 1_000_003 + index) * 1024 + g and every pipeline call has
eval.batch_size images (the last one padded), so the images do not depend on the number of processes (byte-equal
on CPU and on an H200 in fp16; another eval.batch_size can move GPU pixels by one level). Rerunning over the same
folder generates only the missing images and refuses other generation settings (generation.json, written once the
models load, records them; the models by the sha256 of their files, so weights retrained in the same folder are
another setting; paths are compared as absolute paths); metrics of runs with different --metrics are merged. Each
metric is written as soon as it finishes; one that fails is recorded under "errors" in metrics.json and report.md,
the others are kept, and the command exits with code 1. Samples go to processes by index % num_processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from innercontrol import metrics
from innercontrol.config import ConfigError, load_config, precision_dtype
from innercontrol.distributed import finish
from innercontrol.families import NO_CONTROLNET, family_of
from innercontrol.fingerprint import changed_settings, content_digest, normalized_path
from innercontrol.hub import resolve_model
from innercontrol.models import controlnet_folder, stable_diffusion_folder
from innercontrol.report import (
    GRID_ROWS,
    image_path,
    make_grid,
    merge_per_sample,
    report_markdown,
    save_png,
    summarize,
    to_pil,
    write_per_sample,
    write_readout,
    write_text,
)

METRIC_CHOICES = ("control", "clip", "fid", "all")
MAX_IMAGES_PER_PROMPT = 1024  # the seed formula keeps (index, group) distinct below this


# ---------------------------------------------------------------------------------------------------------------
# Files: every image is written to a temporary name and renamed, so an interrupted run leaves no half-written PNG.


def load_images(paths: list[Path]) -> torch.Tensor:
    """PNG files -> (B,3,H,W) float in [0,1]."""
    import numpy as np

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def image_seed(seed: int, index: int, group: int) -> int:
    """Seed of image `group` of eval sample `index`: plain arithmetic, the same on every process and machine."""
    return (seed * 1_000_003 + index) * MAX_IMAGES_PER_PROMPT + group


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------------------------
# The eval set: exported once by the main process, so every process and every rerun sees the same indices.


PATH_KEYS = ("dataset",)  # spelled relative or absolute: compared as absolute paths
LOCATION_KEYS = ("controlnet", "pretrained_model")  # recorded only: the weights are compared by content hash


def eval_set_fingerprint(cfg) -> dict:
    keys = ("dataset", "split", "image_column", "caption_column", "control_column", "resolution", "max_samples")
    fingerprint = {key: cfg.eval[key] for key in keys}
    return {**fingerprint, "dataset": normalized_path(fingerprint["dataset"])}


def is_adapter(cfg) -> bool:
    return cfg.eval.model_kind == "t2i_adapter"


def scheduler_name(cfg) -> str:
    """eval.scheduler, with "auto" resolved to the published evaluation's sampler for the model kind."""
    if cfg.eval.scheduler != "auto":
        return cfg.eval.scheduler
    return "euler_ancestral" if is_adapter(cfg) else "unipc"


def adapter_scale(cfg) -> float:
    """eval.adapter_conditioning_scale, with null resolved to the published setting (0.5 for line art)."""
    if cfg.eval.adapter_conditioning_scale is not None:
        return float(cfg.eval.adapter_conditioning_scale)
    return 0.5 if cfg.condition.name == "lineart" else 1.0


def runs_adapter(cfg, controlnet: str) -> bool:
    """Whether this evaluation generates with a T2I-Adapter (eval.model_kind=t2i_adapter and not the floor)."""
    return is_adapter(cfg) and not is_floor(controlnet)


def controlnet_scale(cfg, controlnet: str) -> Optional[float]:
    """eval.controlnet_conditioning_scale for a ControlNet; None where there is no ControlNet (floor, adapter)."""
    if is_floor(controlnet) or is_adapter(cfg):
        return None
    return float(cfg.eval.controlnet_conditioning_scale)


def unused_scales(cfg, controlnet: str) -> list[str]:
    """The conditioning-scale settings that this evaluation's model does not take (the floor takes neither, a
    ControlNet no adapter scale, a T2I-Adapter no ControlNet scale), as key=value: they are ignored, with a warning."""
    unused = []
    if controlnet_scale(cfg, controlnet) is None and float(cfg.eval.controlnet_conditioning_scale) != 1.0:
        unused.append(f"eval.controlnet_conditioning_scale={cfg.eval.controlnet_conditioning_scale:g}")
    if not runs_adapter(cfg, controlnet) and cfg.eval.adapter_conditioning_scale is not None:
        unused.append(f"eval.adapter_conditioning_scale={cfg.eval.adapter_conditioning_scale:g}")
    return unused


def generation_fingerprint(cfg, controlnet: str, dtype: torch.dtype) -> dict:
    """The settings behind the generated images; the models by the sha256 of their files, so retrained weights in
    the same folder are a different setting (content_digest hashes each file once per process)."""
    keys = ("num_inference_steps", "guidance_scale", "negative_prompt", "images_per_prompt", "seed", "resolution")
    return {
        "pretrained_model": normalized_path(cfg.model.pretrained_model),
        "controlnet": NO_CONTROLNET if is_floor(controlnet) else normalized_path(controlnet),
        "pretrained_model_sha256": content_digest(stable_diffusion_folder(cfg.model.pretrained_model)),
        "controlnet_sha256": NO_CONTROLNET if is_floor(controlnet) else content_digest(resolve_controlnet(controlnet)),
        "variant": cfg.model.variant,
        "dtype": str(dtype).replace("torch.", ""),
        "model_kind": NO_CONTROLNET if is_floor(controlnet) else cfg.eval.model_kind,
        "scheduler": scheduler_name(cfg),
        "adapter_conditioning_scale": adapter_scale(cfg) if runs_adapter(cfg, controlnet) else None,
        "controlnet_conditioning_scale": controlnet_scale(cfg, controlnet),
        "vae_sha256": content_digest(resolve_model(cfg.eval.vae, "VAE", "eval.vae")) if cfg.eval.vae else None,
        **{key: cfg.eval[key] for key in keys},
    }


def check_fingerprint(path: Path, expected: dict, what: str) -> None:
    """Refuse to mix outputs of different settings in one folder (resuming must continue the same evaluation)."""
    found = json.loads(path.read_text())
    if "model_kind" not in found:  # written before T2I-Adapters: a ControlNet (or none) sampled with UniPC
        found.update(model_kind=found.get("controlnet") if found.get("controlnet") == NO_CONTROLNET else "controlnet",
                     scheduler="unipc", adapter_conditioning_scale=None, vae_sha256=None)  # fmt: skip
    if "controlnet_conditioning_scale" not in found:  # written before the option: a ControlNet at the published 1.0
        found["controlnet_conditioning_scale"] = 1.0 if found.get("model_kind") == "controlnet" else None
    found = {k: normalized_path(found.get(k)) if k in PATH_KEYS else found.get(k) for k in expected}
    changed = changed_settings(found, expected, [k for k in expected if k not in LOCATION_KEYS])
    if changed:
        raise ConfigError(
            f"{path.parent} holds {what} made with other settings ({'; '.join(changed)}); "
            "pass another eval.output_dir or delete the folder"
        )


def export_eval_set(cfg, out: Path) -> list[dict]:
    """Main process: write real/{i}.png, controls/{i}.png (when the dataset has a control column) and eval_set.json."""
    manifest = out / "eval_set.json"
    fingerprint = eval_set_fingerprint(cfg)
    if manifest.is_file():
        check_fingerprint(manifest, fingerprint, "an eval set")
        return json.loads(manifest.read_text())["samples"]
    from tqdm.auto import tqdm

    from innercontrol.data import build_dataloader

    # One process reads the whole set in order (no caption dropout: EvalConfig has none), once.
    loader = build_dataloader(
        cfg.eval,
        cfg.eval.batch_size,
        process_index=0,
        num_processes=1,
        seed=cfg.eval.seed,
        split=cfg.eval.split,
        shuffle=False,
        infinite=False,
        num_workers=0,
        config_key="eval",
    )
    samples = []
    for batch in tqdm(loader, desc="export eval set", unit="batch"):
        for k in range(len(batch["caption"])):
            index = len(samples)
            save_png(to_pil((batch["pixel_values"][k] + 1) / 2), out / "real" / f"{index}.png")
            if "control" in batch:
                save_png(to_pil(batch["control"][k]), out / "controls" / f"{index}.png")
            row_id = batch["row_id"][k]
            row_id = row_id.item() if isinstance(row_id, torch.Tensor) else row_id
            samples.append({"index": index, "row_id": row_id, "caption": batch["caption"][k]})
    if not samples:
        raise RuntimeError(f"the eval set {cfg.eval.dataset} (split {cfg.eval.split}) yielded no samples")
    write_text(manifest, json.dumps({**fingerprint, "samples": samples}, indent=1))
    return samples


def compute_missing_controls(cfg, out: Path, indices: list[int], device: torch.device) -> None:
    """Controls computed from the source image with the condition model (purpose "eval"), for this process's share."""
    from innercontrol.conditions import get_condition

    missing = [i for i in indices if not (out / "controls" / f"{i}.png").is_file()]
    if not missing:
        return
    condition = get_condition(cfg.condition.name, cfg.condition.eval_model, device=device, purpose="eval")
    for chunk in batches(missing, cfg.eval.batch_size):
        with torch.no_grad():
            controls = condition(load_images([out / "real" / f"{i}.png" for i in chunk]).to(device))
        for i, control in zip(chunk, controls):
            save_png(to_pil(control), out / "controls" / f"{i}.png")


# ---------------------------------------------------------------------------------------------------------------
# Generation.


def is_floor(controlnet: str) -> bool:
    """--controlnet none: evaluate the base model without a ControlNet (it never sees the controls)."""
    return str(controlnet).lower() == NO_CONTROLNET


def resolve_controlnet(name_or_path: str) -> str:
    """A ControlNet folder (config.json inside), a training output holding controlnet/, or a hub id."""
    return controlnet_folder(name_or_path, config_key="--controlnet")


def pipeline_dtype(cfg, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32  # half precision on the CPU is slow or unsupported
    return precision_dtype(cfg.eval.mixed_precision)


SCHEDULERS = {"unipc": "UniPCMultistepScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler"}


def load_pipeline(cfg, controlnet: str, device: torch.device, dtype: torch.dtype):
    """The pipeline of the base model's family (SD1.5 or SDXL, from model.pretrained_model's model_index.json) for
    the ControlNet, the T2I-Adapter (eval.model_kind=t2i_adapter; --controlnet names it) or nothing (--controlnet
    none), with the family's pipeline class for it (ModelFamily.pipelines); eval.vae replaces the base model's VAE
    (SDXL in fp16: madebyollin/sdxl-vae-fp16-fix); with eval.scheduler (auto: UniPC for ControlNets, Euler ancestral
    for T2I-Adapters)."""
    import diffusers
    from diffusers import AutoencoderKL, ControlNetModel, T2IAdapter

    folder = stable_diffusion_folder(cfg.model.pretrained_model)
    family = family_of(folder)
    kind = NO_CONTROLNET if is_floor(controlnet) else cfg.eval.model_kind
    parts = {}
    if kind == "t2i_adapter":
        parts["adapter"] = T2IAdapter.from_pretrained(resolve_controlnet(controlnet), torch_dtype=dtype)
    elif kind == "controlnet":
        parts["controlnet"] = ControlNetModel.from_pretrained(resolve_controlnet(controlnet), torch_dtype=dtype)
    if cfg.eval.vae:
        vae_folder = resolve_model(cfg.eval.vae, "VAE", "eval.vae")
        parts["vae"] = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=dtype)
    if family.name == "sdxl" and kind != "t2i_adapter":  # (the SDXL adapter pipeline never watermarks)
        parts["add_watermarker"] = False  # the published evaluation scores unwatermarked images
    else:
        parts.update(safety_checker=None, requires_safety_checker=False)
    pipeline_class = getattr(diffusers, family.pipelines[kind])
    pipe = pipeline_class.from_pretrained(folder, **parts, variant=cfg.model.variant, torch_dtype=dtype)
    scheduler_class = getattr(diffusers, SCHEDULERS[scheduler_name(cfg)])
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def control_input(cfg, pipe, controls: torch.Tensor) -> dict:
    """The pipeline's control arguments: the controls and eval.controlnet_conditioning_scale for a ControlNet
    pipeline; the controls (one channel for a one-channel adapter, e.g. sketch / line art) and the conditioning scale
    for a T2I-Adapter pipeline; nothing for the base alone."""
    if hasattr(pipe, "adapter"):
        if pipe.adapter.config.in_channels == 1:
            controls = controls[:, :1]  # the saved control maps are grayscale stored as RGB
        return {"image": controls, "adapter_conditioning_scale": adapter_scale(cfg)}
    if hasattr(pipe, "controlnet"):
        return {"image": controls, "controlnet_conditioning_scale": float(cfg.eval.controlnet_conditioning_scale)}
    return {}


def missing_images(cfg, out: Path, indices: list[int]) -> list[tuple[int, int]]:
    """(index, group) of the images not yet on disk."""
    groups = range(cfg.eval.images_per_prompt)
    return [(i, g) for i in indices for g in groups if not image_path(out, g, i).is_file()]


def generate(cfg, pipe, out: Path, samples: list[dict], todo: list[tuple[int, int]], show_progress: bool) -> None:
    """Generate images (index, group), eval.batch_size per pipeline call, each from its own seed."""
    from tqdm.auto import tqdm

    e = cfg.eval
    progress = tqdm(total=len(todo), desc="generate", unit="img", disable=not show_progress)
    for chunk in batches(todo, e.batch_size):
        # Pad the last batch to full size so every call has the same shape (same kernels, same numerics).
        padded = chunk + [chunk[-1]] * (e.batch_size - len(chunk))
        controls = load_images([out / "controls" / f"{i}.png" for i, _ in padded])
        images = pipe(
            prompt=[samples[i]["caption"] for i, _ in padded],
            **control_input(cfg, pipe, controls),
            negative_prompt=[e.negative_prompt] * len(padded),
            num_inference_steps=e.num_inference_steps,
            guidance_scale=e.guidance_scale,
            height=e.resolution,
            width=e.resolution,
            generator=[torch.Generator().manual_seed(image_seed(e.seed, i, g)) for i, g in padded],
            output_type="pil",
        ).images
        for (i, g), image in zip(chunk, images):
            save_png(image, image_path(out, g, i))
        progress.update(len(chunk))
    progress.close()


# ---------------------------------------------------------------------------------------------------------------
# Metrics per image (each process scores its share) and over the whole set (main process).


def control_scores(
    cfg, condition, out: Path, chunk: list[tuple[int, int]], device: torch.device, real: bool = False
) -> dict:
    """Controllability of images (index, group): the condition of the generated image vs the input control.
    real=True scores the real eval images instead (the ceiling)."""
    paths = [out / "real" / f"{i}.png" if real else image_path(out, g, i) for i, g in chunk]
    generated = load_images(paths).to(device)
    if condition.metric == "f1":
        # Canny F1: binary edges of the generated image vs binary edges of the source image (same detector).
        label = condition.binary_edges(load_images([out / "real" / f"{i}.png" for i, _ in chunk]).to(device))
        return {"f1": metrics.edge_f1(condition.binary_edges(generated), label)}
    label = load_images([out / "controls" / f"{i}.png" for i, _ in chunk]).to(device)
    if condition.metric == "rmse":
        # The protocol divides the raw prediction by its max; fall back to the control map for other depth models.
        predict = getattr(condition, "predict_depth", condition)
        return {"rmse": metrics.depth_rmse(predict(generated), label)}
    if condition.metric == "ms_ssim":
        pred = condition(generated)
        scores = {"ms_ssim": metrics.ms_ssim(pred, label), "ssim": metrics.ssim(pred, label)}
        if cfg.condition.name == "lineart":  # the published table's way as well, for a like-for-like comparison
            published = metrics.published_lineart_map
            scores["ms_ssim_published_uint8"] = metrics.ms_ssim(published(pred), published(label))
        return scores
    raise ValueError(f"condition '{cfg.condition.name}' has an unknown metric '{condition.metric}'")


def reextracted_control(condition, image: torch.Tensor) -> torch.Tensor:
    """The control read back from a generated image, for the grid."""
    if condition.metric == "f1":
        return condition.binary_edges(image).expand(-1, 3, -1, -1)
    return condition(image)


@torch.no_grad()
def score_images(
    cfg, wanted: set, out: Path, samples: list[dict], indices: list[int], device, show_progress, real_rows=None
) -> list:
    """Per-image rows {index, group, <metric>: value} for this process's indices; with the control metric and a list
    `real_rows`, appends {index, real_images_<metric>: value} rows of the real images (the ceiling) to it."""
    from tqdm.auto import tqdm

    items = [(i, g) for i in indices for g in range(cfg.eval.images_per_prompt)]
    rows = {item: {"index": item[0], "group": item[1]} for item in items}
    if "control" in wanted:
        from innercontrol.conditions import get_condition

        condition = get_condition(cfg.condition.name, cfg.condition.eval_model, device=device, purpose="eval")
        for chunk in tqdm(batches(items, cfg.eval.batch_size), desc="controllability", disable=not show_progress):
            for name, values in control_scores(cfg, condition, out, chunk, device).items():
                for item, value in zip(chunk, values.tolist()):
                    rows[item][name] = value
        # The ceiling: the real images against their own controls. Not for canny (the label is the real image's own
        # edges, F1 = 1) nor for controls this evaluator computed itself (a perfect score by construction).
        if real_rows is not None and condition.metric != "f1" and cfg.eval.control_column is not None:
            for chunk in batches([(i, 0) for i in indices], cfg.eval.batch_size):
                for name, values in control_scores(cfg, condition, out, chunk, device, real=True).items():
                    real_rows.extend(
                        {"index": i, f"real_images_{name}": v} for (i, _), v in zip(chunk, values.tolist())
                    )
        for i in [i for i in indices if i < GRID_ROWS]:
            control = reextracted_control(condition, load_images([image_path(out, 0, i)]).to(device))
            save_png(to_pil(control[0]), out / "reextracted" / f"{i}.png")
        del condition
    if "clip" in wanted:
        from transformers import CLIPModel, CLIPProcessor

        folder = resolve_model(cfg.eval.clip_model, what="CLIP model", config_key="eval.clip_model")
        model = CLIPModel.from_pretrained(folder).to(device).eval()
        processor = CLIPProcessor.from_pretrained(folder)
        for chunk in tqdm(batches(items, cfg.eval.batch_size), desc="CLIP score", disable=not show_progress):
            images = load_images([image_path(out, g, i) for i, g in chunk])
            scores = metrics.clip_score(images, [samples[i]["caption"] for i, _ in chunk], model, processor)
            for item, value in zip(chunk, scores.tolist()):
                rows[item]["clip_score"] = value
        del model
    return list(rows.values())


def fid_per_group(cfg, out: Path, device: torch.device, feature_extractor=None) -> list[float]:
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    if feature_extractor is None and cfg.eval.fid_features == "clip":
        folder = resolve_model(cfg.eval.clip_model, what="CLIP model", config_key="eval.clip_model")
        feature_extractor = metrics.clip_feature_extractor(folder, device)
    return [
        metrics.fid(
            out / "real",
            out / "images" / f"group_{g}",
            device=device,
            num_workers=workers,
            inception_weights=cfg.eval.inception_weights,
            feature_extractor=feature_extractor,
        )
        for g in range(cfg.eval.images_per_prompt)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Report and grid.


# ---------------------------------------------------------------------------------------------------------------
# The whole evaluation.


def make_accelerator():
    from accelerate import Accelerator, InitProcessGroupKwargs

    # Generous timeout: the other processes wait while the main process exports the eval set and computes FID.
    # cpu=True on machines without CUDA: several processes then run on the CPU (gloo) instead of each running alone.
    return Accelerator(
        cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))]
    )


class MetricsFailed(RuntimeError):
    """Some metrics failed; the others were written. Carries the results; main() exits with code 1."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


def failure_message(err: Exception) -> str:
    """One line for metrics.json and the log; a traceback too when the failure looks like a bug, not the setup."""
    if not isinstance(err, (ConfigError, OSError, RuntimeError, ValueError)):
        traceback.print_exc()
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def write_results(cfg, out: Path, results: dict, num_samples: int) -> None:
    """metrics.json, report.md and grid.png as they stand (called after every metric, so a later failure keeps them)."""
    write_text(out / "metrics.json", json.dumps(results, indent=1))
    report = report_markdown(cfg, results)
    if results.get("errors"):
        report += "\nFailed metrics (no value above; rerun with the fix, the other results are kept):\n\n"
        report += "".join(f"- {name}: {message}\n" for name, message in results["errors"].items())
    write_text(out / "report.md", report)
    make_grid(cfg, out, num_samples)


def evaluate(cfg, controlnet: str, wanted: set, accelerator=None, fid_feature_extractor=None) -> Optional[dict]:
    """Generate the missing images, score them, and write the outputs; returns the metrics on the main process.

    Each metric's results are written as soon as it finishes; a metric that fails is recorded under "errors" in
    metrics.json and the main process then raises MetricsFailed (the other processes return None as usual).
    """
    from accelerate.utils import gather_object

    accelerator = accelerator or make_accelerator()
    out = Path(cfg.eval.output_dir)
    device = accelerator.device
    dtype = pipeline_dtype(cfg, device)
    if cfg.eval.images_per_prompt > MAX_IMAGES_PER_PROMPT:
        raise ConfigError(f"eval.images_per_prompt must be at most {MAX_IMAGES_PER_PROMPT}")
    log = accelerator.print
    for setting in unused_scales(cfg, controlnet):
        model = (
            "the base model alone" if is_floor(controlnet) else "a T2I-Adapter" if is_adapter(cfg) else "a ControlNet"
        )
        log(f"warning: {setting} is ignored: this evaluation runs {model}, which does not take it")

    pipe = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        export_eval_set(cfg, out)
        settings_file = out / "generation.json"
        fingerprint = generation_fingerprint(cfg, controlnet, dtype)
        if settings_file.is_file():
            check_fingerprint(settings_file, fingerprint, "images")
        else:
            # Load first: a command whose models do not load must not tie the folder to its settings.
            pipe = load_pipeline(cfg, controlnet, device, dtype)
            write_text(settings_file, json.dumps(fingerprint, indent=1))
    accelerator.wait_for_everyone()
    samples = json.loads((out / "eval_set.json").read_text())["samples"]
    mine = [s["index"] for s in samples if s["index"] % accelerator.num_processes == accelerator.process_index]

    compute_missing_controls(cfg, out, mine, device)
    todo = missing_images(cfg, out, mine)
    if todo:
        if pipe is None:
            pipe = load_pipeline(cfg, controlnet, device, dtype)
        generate(cfg, pipe, out, samples, todo, show_progress=accelerator.is_local_main_process)
    if pipe is not None:
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    made = sum(gather_object([len(todo)]))
    total = len(samples) * cfg.eval.images_per_prompt
    log(
        f"generated {made} new images ({total - made} were already on disk) on {accelerator.num_processes} "
        f"process(es) in {out / 'images'}"
    )

    results, failed = {}, {}  # failed: metric -> message, this run
    if accelerator.is_main_process:
        results = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        results.update(condition=cfg.condition.name, num_samples=len(samples), settings=fingerprint)

    def record(metric: str, error: Optional[str]) -> None:
        errors = {k: v for k, v in results.get("errors", {}).items() if k != metric}
        if error is not None:
            failed[metric] = errors[metric] = error
            log(f"{metric} failed: {error}")
        results.pop("errors", None)
        if errors:
            results["errors"] = errors
        write_results(cfg, out, results, len(samples))

    # Per-image metrics, one at a time: every process scores its share, then the main process merges and writes.
    for metric in [m for m in ("control", "clip") if m in wanted]:
        try:
            real_rows = []
            scored, error = (
                score_images(cfg, {metric}, out, samples, mine, device, accelerator.is_local_main_process, real_rows),
                None,
            )
        except Exception as err:
            scored, error = [], failure_message(err)
        gathered = gather_object([(scored, error, real_rows)])
        if not accelerator.is_main_process:
            continue
        error = next((e for _, e, _ in gathered if e is not None), None)
        if error is None:  # a metric that failed on any process is not averaged over the others' share
            all_rows = merge_per_sample(out / "per_sample.csv", [r for rows, _, _ in gathered for r in rows], samples)
            write_per_sample(out / "per_sample.csv", all_rows)
            results.update(summarize(all_rows, cfg.eval.images_per_prompt))
            real = [row for _, _, rows in gathered for row in rows]
            for name in sorted({k for row in real for k in row} - {"index"}):
                results[name] = sum(row[name] for row in real) / len(real)
        record(metric, error)
    if not accelerator.is_main_process:
        return None

    if "fid" in wanted:
        try:
            scores, error = fid_per_group(cfg, out, device, fid_feature_extractor), None
            results.update(fid=sum(scores) / len(scores), fid_per_group=scores, fid_features=cfg.eval.fid_features)
        except Exception as err:
            error = failure_message(err)
        record("fid", error)
    if not wanted & {"control", "clip", "fid"}:
        write_results(cfg, out, results, len(samples))
    shown = {k: round(v, 4) for k, v in results.items() if isinstance(v, float)}
    log(f"metrics: {shown}; written to {out / 'metrics.json'}, {out / 'report.md'}")
    if failed:
        details = "; ".join(f"{name}: {message}" for name, message in failed.items())
        raise MetricsFailed(
            f"{len(failed)} metric(s) failed ({details}); the others are in {out / 'metrics.json'}", results
        )
    return results


# ---------------------------------------------------------------------------------------------------------------
# Probe readout analysis: how early in sampling the probe can read the control out of the decoder features.


@torch.no_grad()
def probe_readout(cfg, controlnet: str, probe_path: str, num_samples: int = 8, accelerator=None) -> list[dict]:
    """Alignment error of the probe against the input control at each sampling step (group-0 seeds).

    Writes probe_readout.csv, probe_readout.md (table) and probe_readout.png (plot) to eval.output_dir; runs on the
    main process over the first `num_samples` eval samples.
    """
    from innercontrol.conditions import get_condition
    from innercontrol.controlled_unet import tap_decoder_features
    from innercontrol.losses import alignment_error
    from innercontrol.probes import load_probe
    from innercontrol.readout import ProbeReadout

    if runs_adapter(cfg, controlnet):
        raise ConfigError(
            "the probe readout runs on ControlNets and on the base alone (--controlnet none), not on T2I-Adapters "
            "(eval.model_kind=t2i_adapter): drop --probe or evaluate a ControlNet"
        )
    accelerator = accelerator or make_accelerator()
    out = Path(cfg.eval.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        export_eval_set(cfg, out)
    accelerator.wait_for_everyone()
    samples = json.loads((out / "eval_set.json").read_text())["samples"]
    indices = [s["index"] for s in samples[:num_samples]]
    device = accelerator.device
    compute_missing_controls(
        cfg, out, [i for i in indices if i % accelerator.num_processes == accelerator.process_index], device
    )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return []

    e = cfg.eval
    dtype = pipeline_dtype(cfg, device)
    pipe = load_pipeline(cfg, controlnet, device, dtype)
    probe = load_probe(probe_path, trust_pickle=cfg.probe.trust_pickle, timestep_input=cfg.probe.timestep_input)
    probe = probe.to(device)
    tap = probe.config.tap or cfg.model.tap
    condition = get_condition(cfg.condition.name, cfg.condition.eval_model, device=device, purpose="eval")
    errors: dict[int, list[tuple[float, float, int]]] = {}  # step -> [(t, mean error, batch size)]
    labels = []  # alignment labels of every prompt, for the mean-map baseline
    for chunk in batches(indices, e.batch_size):
        controls = load_images([out / "controls" / f"{i}.png" for i in chunk]).to(device)
        labels.append(condition.normalize_label(controls.float()))
        with tap_decoder_features(pipe.unet, tap) as features:
            readout = ProbeReadout(probe, features, batch_size=len(chunk))
            pipe(
                prompt=[samples[i]["caption"] for i in chunk],
                **control_input(cfg, pipe, controls),
                negative_prompt=[e.negative_prompt] * len(chunk),
                num_inference_steps=e.num_inference_steps,
                guidance_scale=e.guidance_scale,
                height=e.resolution,
                width=e.resolution,
                generator=[torch.Generator().manual_seed(image_seed(e.seed, i, 0)) for i in chunk],
                output_type="latent",
                callback_on_step_end=readout,
            )
        for step, (timestep, prediction) in readout.predictions.items():
            error = alignment_error(prediction.to(device), controls, condition).mean()
            errors.setdefault(step, []).append((timestep, float(error), len(chunk)))
    labels = torch.cat(labels)
    mean_map_mse = float((labels - labels.mean(0, keepdim=True)).pow(2).flatten(1).mean(1).mean())
    table = [
        {
            "step": step,
            "timestep": entries[0][0],
            "probe_mse": sum(err * n for _, err, n in entries) / sum(n for _, _, n in entries),
            "mean_map_mse": mean_map_mse,
        }
        for step, entries in sorted(errors.items())
    ]
    scale = controlnet_scale(cfg, controlnet)
    setting = f", ControlNet conditioning scale {scale:g}" if scale not in (None, 1.0) else ""
    write_readout(out, table, probe_path, len(indices), setting)
    return table


# ---------------------------------------------------------------------------------------------------------------


def metric_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRIC_CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown metric {unknown}: choose from {', '.join(METRIC_CHOICES)}")
    return names


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m innercontrol.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # what to evaluate
    parser.add_argument("--config", required=True, help="experiment YAML (configs/depth.yaml, hed, lineart, tiny)")
    parser.add_argument(
        "--controlnet",
        default=None,
        help="ControlNet to evaluate: hub id or local folder (default: model.controlnet); 'none' evaluates the base "
        "model alone on the same prompts, controls and seeds (the floor); with eval.model_kind=t2i_adapter, the "
        "T2I-Adapter to evaluate",
    )
    # what to compute
    parser.add_argument(
        "--metrics",
        type=metric_list,
        default=None,
        help="comma-separated: control (RMSE / MS-SSIM / F1, per condition), clip, fid, all "
        "(default: all; none with --probe)",
    )
    parser.add_argument("--probe", default=None, help="probe folder or .pt: run the probe readout analysis")
    parser.add_argument("--probe-samples", type=int, default=8, help="eval prompts used by the probe readout")
    # configuration overrides
    parser.add_argument(
        "overrides", nargs="*", help="key=value config overrides, e.g. eval.guidance_scale=3.0 eval.max_samples=100"
    )
    return parser.parse_intermixed_args(argv)  # key=value overrides may follow options too


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    controlnet = args.controlnet or cfg.model.controlnet
    if controlnet is None:
        raise ConfigError("no ControlNet to evaluate: pass --controlnet PATH_OR_ID (or set model.controlnet)")
    wanted = set(args.metrics or ([] if args.probe else ["all"]))
    if "all" in wanted:
        wanted = {"control", "clip", "fid"}
    accelerator = make_accelerator()
    if args.probe:
        probe_readout(cfg, controlnet, args.probe, args.probe_samples, accelerator)
    if wanted or not args.probe:
        try:
            evaluate(cfg, controlnet, wanted, accelerator)
        except MetricsFailed as err:  # the other results are written; the exit code says something failed
            finish(accelerator)
            sys.exit(f"error: {err}")
    finish(accelerator)  # the others wait for the main process's FID and reports, then all leave together


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    run_cli(main)
