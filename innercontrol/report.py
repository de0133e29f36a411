"""Evaluation outputs: file helpers, the markdown report beside the published numbers, the image grid, CSVs.

Split from evaluate.py, which generates and scores; this module only writes what a reader looks at.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

GRID_ROWS = 4
GRID_CELL = 256
LABEL_HEIGHT = 16  # pixels of the strip above a grid that names its columns


def to_pil(x) -> Image.Image:
    """(3,H,W) float tensor in [0,1] -> RGB PIL image."""
    import torch

    array = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def image_path(out: Path, group: int, index: int) -> Path:
    return out / "images" / f"group_{group}" / f"{index}.png"


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# Published MultiGen-20M results (DESIGN section 6): condition -> guidance -> method -> (control metric, FID, CLIP).
PUBLISHED = {
    "hed": {
        7.5: {
            "ControlNet": (0.7621, 15.41, 31.46),
            "ControlNet++": (0.8097, 15.01, 32.05),
            "Ctrl-U": (0.8401, 11.59, 32.05),
            "InnerControl": (0.8207, 13.27, 31.99),
        },
        3.0: {"InnerControl": (0.8305, 12.16, 31.28)},
    },
    "lineart": {
        7.5: {
            "ControlNet": (0.7054, 17.44, 31.26),
            "ControlNet++": (0.8399, 13.88, 31.95),
            "Ctrl-U": (0.8250, 12.04, 31.88),
            "InnerControl": (0.8258, 12.08, 31.97),
        },
        3.0: {"InnerControl": (0.8395, 11.38, 31.30)},
    },
    "depth": {
        7.5: {
            "ControlNet": (35.90, 17.76, 32.11),
            "ControlNet++": (28.32, 16.66, 32.09),
            "Ctrl-U": (29.06, 19.73, 31.88),
            "InnerControl": (26.09, 18.29, 31.97),
            # The other baseline kinds of the paper's table (depth RMSE only; DESIGN section 7).
            "T2I-Adapter (SD1.5)": (48.40, None, None),
            "SDXL ControlNet": (40.00, None, None),
            "SDXL T2I-Adapter": (39.75, None, None),
        },
        3.0: {"InnerControl": (25.10, 14.67, 31.18)},
    },
}


def merge_per_sample(path: Path, new_rows: list[dict], samples: list[dict]) -> list[dict]:
    """Rows of per_sample.csv updated with this run's columns (earlier runs' other metrics are kept)."""
    merged = {}
    if path.is_file():
        with path.open() as f:
            for row in csv.DictReader(f):
                key = (int(row["index"]), int(row["group"]))
                merged[key] = {k: (float(v) if k not in ("caption", "row_id") else v) for k, v in row.items() if v}
    for row in new_rows:
        key = (row["index"], row["group"])
        merged.setdefault(key, {}).update(row)
    rows = [merged[key] for key in sorted(merged)]
    for row in rows:
        row["index"], row["group"] = int(row["index"]), int(row["group"])
        row["row_id"] = samples[row["index"]]["row_id"]
        row["caption"] = samples[row["index"]]["caption"]
    return rows


def write_per_sample(path: Path, rows: list[dict]) -> None:
    metric_columns = sorted({k for row in rows for k in row} - {"index", "group", "row_id", "caption"})
    columns = ["index", "group", "row_id", *metric_columns, "caption"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def summarize(rows: list[dict], images_per_prompt: int) -> dict:
    """Mean of every per-image metric over all images, and per group."""
    summary = {}
    names = sorted({k for row in rows for k in row} - {"index", "group", "row_id", "caption"})
    for name in names:
        values = [(row["group"], row[name]) for row in rows if name in row]
        summary[name] = sum(v for _, v in values) / len(values)
        summary[f"{name}_per_group"] = [
            sum(v for g, v in values if g == group) / max(1, sum(1 for g, _ in values if g == group))
            for group in range(images_per_prompt)
        ]
    return summary


def published_rows(condition: str, guidance: float) -> dict:
    for scale, rows in PUBLISHED.get(condition, {}).items():
        if math.isclose(scale, guidance):
            return rows
    return {}


def fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_markdown(cfg, results: dict) -> str:
    """The metrics beside the published ones; results of the tiny random models are labelled and kept apart."""
    from innercontrol.tiny import is_tiny

    condition, guidance = cfg.condition.name, float(cfg.eval.guidance_scale)
    metric = {"depth": "rmse", "hed": "ms_ssim", "lineart": "ms_ssim", "canny": "f1"}.get(condition)
    header = {"rmse": "RMSE (lower is better)", "ms_ssim": "SSIM* (higher is better)", "f1": "F1 (higher is better)"}
    digits = 2 if metric == "rmse" else 4
    settings = results["settings"]
    kind = "T2I-Adapter" if settings.get("model_kind") == "t2i_adapter" else "ControlNet"
    sampler = {"euler_ancestral": "Euler ancestral"}.get(settings.get("scheduler"), "UniPC")
    if settings.get("adapter_conditioning_scale") is not None:
        kind += f" (conditioning scale {settings['adapter_conditioning_scale']:g})"
    if settings.get("controlnet_conditioning_scale") not in (None, 1.0):  # 1.0: the published evaluation's
        kind += f" (conditioning scale {settings['controlnet_conditioning_scale']:g})"
    lines = [
        f"# Evaluation: {condition}, guidance {guidance:g}",
        "",
        f"{kind} `{settings['controlnet']}` on `{settings['pretrained_model']}`; "
        f"eval set `{cfg.eval.dataset}` ({cfg.eval.split}), {results['num_samples']} prompts x "
        f"{cfg.eval.images_per_prompt} images, {cfg.eval.resolution} px, {cfg.eval.num_inference_steps} {sampler} steps, "
        f"seed {cfg.eval.seed}.",
        "",
    ]
    fid_header = "FID (lower is better)"
    if results.get("fid_features") == "clip":
        fid_header = "FID on CLIP features, not Inception (lower is better)"
    columns = [
        f"| method | {header.get(metric, metric)} | {fid_header} | CLIP score (higher is better) |",
        "| --- | --- | --- | --- |",
    ]
    published = [
        f"| {method} (published) | {fmt(control, digits)} | {fmt(fid_value, 2)} | {fmt(clip, 2)} |"
        for method, (control, fid_value, clip) in published_rows(condition, guidance).items()
    ]
    ours = (
        f"| {fmt(results.get(metric), digits)} | {fmt(results.get('fid'), 2)} | {fmt(results.get('clip_score'), 2)} |"
    )
    if is_tiny(cfg.model.pretrained_model):  # innercontrol.tiny's marker file: random weights
        lines += [
            f"**Tiny random-weight models** (`{cfg.model.pretrained_model}`, written by `python -m innercontrol.tiny`): "
            "these numbers test the machinery only and are not comparable with any published result.",
            "",
            *columns,
            f"| ours (tiny random weights) {ours}",
            "",
        ]
        if published:
            lines += ["Published SD1.5 numbers, for reference only (not comparable with the row above):", ""]
            lines += [*columns, *published, ""]
    elif is_miniature(cfg.model.pretrained_model):
        lines += [
            f"**The miniature** (`{cfg.model.pretrained_model}`, trained by `python -m innercontrol.pretrain_mini` on "
            "the synthetic scenes): a testbed for the method; its numbers are not comparable with SD1.5's.",
            "",
            *columns,
            f"| ours (miniature) {ours}",
            "",
        ]
    else:
        lines += [*columns, *published, f"| **ours** {ours}", ""]
    if metric is not None and results.get(f"real_images_{metric}") is not None:
        lines += [
            f"Ceiling: the real eval images scored against their own controls by the same evaluator: "
            f"{metric} {fmt(results[f'real_images_{metric}'], digits)}.",
            "",
        ]
    if not published_rows(condition, guidance):
        lines.append(f"No published numbers for {condition} at guidance {guidance:g} (DESIGN section 6).")
    if metric == "ms_ssim":
        lines.append(
            "*The published column is labelled SSIM; the protocol (DESIGN section 4) is MS-SSIM with data_range 1, "
            f"which our row shows. Our single-scale SSIM: {fmt(results.get('ssim'), 4)}."
        )
    lines += comparability_notes(condition, results)
    if cfg.eval.resolution < 176 and metric == "ms_ssim":
        lines.append("MS-SSIM at this resolution uses fewer than 5 scales (metrics.ms_ssim): not comparable.")
    if results["num_samples"] < 5000 or cfg.eval.resolution != 512:
        lines.append(
            "The published numbers use the 5000-prompt MultiGen-20M eval set at 512 px; this run differs, so compare "
            "with care (FID in particular depends on the number of images)."
        )
    per_group = [k for k in sorted(results) if k.endswith("_per_group")]
    if per_group:
        lines += [
            "",
            "Per group (images_per_prompt):",
            "",
            "| metric | " + " | ".join(f"group {g}" for g in range(cfg.eval.images_per_prompt)) + " |",
        ]
        lines.append("| --- |" + " --- |" * cfg.eval.images_per_prompt)
        for key in per_group:
            lines.append(f"| {key[: -len('_per_group')]} | " + " | ".join(fmt(v, 4) for v in results[key]) + " |")
    return "\n".join(lines) + "\n"


MINI_REPORT = "report.json"  # written by innercontrol.pretrain_mini next to the pipeline it trained


def is_miniature(model_path) -> bool:
    """True for a folder written by innercontrol.pretrain_mini (its quality report names the preset)."""
    if model_path is None or not (Path(model_path) / MINI_REPORT).is_file():
        return False
    try:
        return "preset" in json.loads((Path(model_path) / MINI_REPORT).read_text())
    except (OSError, ValueError):
        return False


def comparability_notes(condition: str, results: dict) -> list[str]:
    """Where our numbers differ from the published ones by design (DESIGN 7), and how to compare like for like."""
    if condition == "hed":
        return [
            "HED: our reward has a real gradient; ControlNet++'s HED reward ends in a uint8 cast, so its HED runs "
            "trained without an effective reward term (`loss.reward_weight=0` reproduces that objective)."
        ]
    if condition == "lineart":
        return [
            "Line art: our MS-SSIM inverts the line maps in float. The published evaluation inverts a uint8 map, "
            "whose `1 - x` wraps (values 0 and 1 become ~0, every other value moves by 2/255); computed that way, "
            f"like for like with the published table: {fmt(results.get('ms_ssim_published_uint8'), 4)} "
            "(`ms_ssim_published_uint8`)."
        ]
    return []


def with_column_labels(grid: Image.Image, labels: list[str]) -> Image.Image:
    """The grid below a white strip naming each of its equally wide columns."""
    labelled = Image.new("RGB", (grid.width, grid.height + LABEL_HEIGHT), "white")
    labelled.paste(grid, (0, LABEL_HEIGHT))
    draw, font = ImageDraw.Draw(labelled), ImageFont.load_default()
    width = grid.width // len(labels)
    for column, label in enumerate(labels):
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        x = column * width + max(0, (width - (right - left)) // 2)
        draw.text((x, (LABEL_HEIGHT - (bottom - top)) // 2 - top), label, fill="black", font=font)
    return labelled


def make_grid(cfg, out: Path, num_samples: int) -> Optional[Path]:
    """Rows: control | generated x images_per_prompt | control re-extracted from group 0 (when computed)."""
    rows = [i for i in range(min(GRID_ROWS, num_samples))]
    if not rows:
        return None
    cell = min(GRID_CELL, cfg.eval.resolution)
    columns = 2 + cfg.eval.images_per_prompt
    grid = Image.new("RGB", (columns * cell, len(rows) * cell), "white")
    for r, i in enumerate(rows):
        paths = [out / "controls" / f"{i}.png"]
        paths += [image_path(out, g, i) for g in range(cfg.eval.images_per_prompt)]
        paths += [out / "reextracted" / f"{i}.png"]
        for c, path in enumerate(paths):
            if path.is_file():
                with Image.open(path) as image:
                    grid.paste(image.convert("RGB").resize((cell, cell), Image.BICUBIC), (c * cell, r * cell))
    labels = ["control", *(f"generated {g}" for g in range(cfg.eval.images_per_prompt)), "re-extracted 0"]
    save_png(with_column_labels(grid, labels), out / "grid.png")
    return out / "grid.png"


def write_readout(out: Path, table: list[dict], probe_path: str, num_samples: int, setting: str = "") -> None:
    """Table, CSV and plot of the probe's error at each sampling step, beside the mean-map baseline; `setting` names
    a non-default generation setting in the heading."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "probe_readout.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "timestep", "probe_mse", "mean_map_mse"])
        writer.writeheader()
        writer.writerows(table)
    lines = [
        f"# Probe readout: `{probe_path}`, {num_samples} prompts{setting}",
        "",
        "Alignment error (MSE of the normalised probe prediction against the input control) at each sampling step, "
        "beside the baseline: the error of predicting the mean control map of these prompts for every one of them.",
        "",
        "| step | t | probe MSE | mean-map MSE |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['step']} | {row['timestep']} | {row['probe_mse']:.5f} | {row['mean_map_mse']:.5f} |" for row in table
    ]
    write_text(out / "probe_readout.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    timesteps = [row["timestep"] for row in table]
    ax.plot(timesteps, [row["probe_mse"] for row in table], marker="o", label="probe")
    ax.plot(timesteps, [row["mean_map_mse"] for row in table], "--", color="gray", label="mean control map")
    ax.legend()
    ax.invert_xaxis()  # sampling runs from t = 999 down to 0
    ax.set_xlabel("timestep t (sampling order: left to right)")
    ax.set_ylabel("probe MSE vs input control")
    ax.set_title("Probe readout during sampling")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "probe_readout.png", dpi=120)
    plt.close(fig)
