"""The embedded default, end to end, offline on the CPU (what `make demo` runs; about 10 minutes).

    python -m innercontrol.demo --out outputs/demo                  # the trained miniature (checkpoints/mini)
    python -m innercontrol.demo --out outputs/demo --model tiny     # the random-weight tiny models (machinery only)

With the miniature (configs/mini.yaml; checkpoints/mini is committed, trained by `python -m innercontrol.pretrain_mini`):
  1. python -m innercontrol.synthetic     held-out-seed synthetic scenes (64 px; the miniature never saw them)
  2. python -m innercontrol.train_probes  probe pretraining on the mini UNet + probe accuracy vs timestep
  3. python -m innercontrol.train         InnerControl training of a ControlNet initialised from the mini UNet
  4. python -m innercontrol.evaluate      the floor: the base model alone (--controlnet none)
  5. python -m innercontrol.evaluate      the trained ControlNet (depth RMSE, CLIP score, FID on mini-CLIP features)
                                          and the probe readout across sampling steps
Then OUT/summary.md sets floor, ControlNet and ceiling (the depth model on the real scenes) side by side and
OUT/summary_grid.png shows control | base alone | its depth | ControlNet | its depth | real scene.
With --model tiny, stage 0 writes the tiny random-weight pipeline (python -m innercontrol.tiny) and configs/tiny.yaml
is used: its numbers exercise the machinery and say nothing (FID skipped).
Running it again starts over: the training stages pass logging.overwrite=true and the evaluation folders are
cleared, replacing the earlier demo's runs (evaluation refuses to mix images of other weights in one folder).
Paths under the working directory are passed relative, so the reports carry no absolute path of this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"mini": ROOT / "configs" / "mini.yaml", "tiny": ROOT / "configs" / "tiny.yaml"}
MINIATURE = ROOT / "checkpoints" / "mini"
# Synthetic scenes of the demo: the miniature was pretrained on seed 0, so the demo's data (and its held-out split)
# come from seed 1; 64 px, antialiased as in pretraining.
SCENES = {"mini": dict(resolution=64, supersample=2, seed=1), "tiny": dict(resolution=128, supersample=1, seed=0)}
NUM_IMAGES = {"mini": 640, "tiny": 480}  # default --num-images: scenes written, 10% of them held out


def shown(path: Path) -> Path:
    """`path` relative to the working directory when it lies under it (commands in reports stay portable)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def path_overrides(out: Path, model: str, miniature: Path) -> list[str]:
    common = [
        f"data.dataset={out / 'synthetic'}",
        f"eval.dataset={out / 'synthetic'}",
        f"probe.path={out / 'probe'}",
        f"eval.output_dir={out / 'eval'}",
    ]
    if model == "mini":
        return [
            f"model.pretrained_model={miniature}",
            f"condition.reward_model={miniature}/dpt",
            f"condition.eval_model={miniature}/dpt",
            f"eval.clip_model={miniature}/clip",
            *common,
        ]
    tiny = out / "tiny"
    return [
        f"model.pretrained_model={tiny}",
        f"model.controlnet={tiny}/controlnet",
        f"condition.reward_model={tiny}/dpt",
        f"condition.eval_model={tiny}/dpt",
        f"eval.clip_model={tiny}/clip",
        *common,
    ]


def run(stage: str, args: list[str]) -> None:
    print(f"\n=== {stage}: python -m {' '.join(args[:1])} ...", flush=True)
    start = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", *args], check=True, env=env)
    print(f"=== {stage} done in {time.time() - start:.0f} s", flush=True)


def check_miniature(folder: Path) -> None:
    missing = [
        part
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "dpt", "clip")
        if not (folder / part).is_dir()
    ]
    if missing:
        raise SystemExit(
            f"error: the miniature '{folder}' lacks {', '.join(missing)}: it is committed under checkpoints/mini "
            "(restore it with `git checkout -- checkpoints/mini`), or retrain it with "
            "`python -m innercontrol.pretrain_mini --out checkpoints/mini` (about 2 h on a CPU); "
            "`--model tiny` runs the demo on random-weight models instead"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="folder for every output of the demo")
    parser.add_argument(
        "--model", default="mini", choices=sorted(CONFIGS), help="mini: the trained miniature (default); tiny: random"
    )
    parser.add_argument("--miniature", default=str(MINIATURE), help="the miniature's folder (default checkpoints/mini)")
    parser.add_argument("--num-images", type=int, default=None, help="synthetic scenes, 10%% held out (default 640)")
    parser.add_argument("--probe-steps", type=int, default=None, help="default: probe.max_steps of the config")
    parser.add_argument("--train-steps", type=int, default=None, help="default: optim.max_steps of the config")
    args = parser.parse_args(argv)
    out = shown(Path(args.out))
    out.mkdir(parents=True, exist_ok=True)
    miniature = shown(Path(args.miniature))
    if args.model == "mini":
        check_miniature(miniature)
    start = time.time()
    (out / "demo.json").write_text(json.dumps({"model": args.model}) + "\n")  # which figures `make figures` copies
    common = ["--config", str(shown(CONFIGS[args.model])), *path_overrides(out, args.model, miniature)]
    scenes = SCENES[args.model]
    num_images = args.num_images if args.num_images is not None else NUM_IMAGES[args.model]
    if num_images < 2:
        parser.error("--num-images must be at least 2 (10%% of them are held out)")
    stages = 5

    step = 0

    def stage(name: str) -> str:
        nonlocal step
        step += 1
        return f"{step}/{stages} {name}"

    if args.model == "tiny":
        run(stage("tiny pipeline"), ["innercontrol.tiny", "--out", str(out / "tiny")])
    run(
        stage("synthetic data"),
        [
            "innercontrol.synthetic",
            "--out",
            str(out / "synthetic"),
            "--num",
            str(num_images),
            "--resolution",
            str(scenes["resolution"]),
            "--supersample",
            str(scenes["supersample"]),
            "--seed",
            str(scenes["seed"]),
        ],
    )
    run(
        stage("probe pretraining"),
        [
            "innercontrol.train_probes",
            *common,
            f"probe.output_dir={out / 'probe_run'}",
            "logging.overwrite=true",
            *([f"probe.max_steps={args.probe_steps}"] if args.probe_steps else []),
            "logging.checkpoint_every=100000",
        ],
    )
    run(
        stage("aligned ControlNet training"),
        [
            "innercontrol.train",
            *common,
            f"logging.output_dir={out / 'train'}",
            "logging.overwrite=true",
            *([f"optim.max_steps={args.train_steps}"] if args.train_steps else []),
        ],
    )
    metrics = "control,clip,fid" if args.model == "mini" else "control,clip"
    if args.model == "mini":
        shutil.rmtree(out / "eval_floor", ignore_errors=True)
        run(
            stage("evaluation of the floor (no ControlNet)"),
            [
                "innercontrol.evaluate",
                *common,
                f"eval.output_dir={out / 'eval_floor'}",
                "--controlnet",
                "none",
                "--metrics",
                metrics,
            ],
        )
    shutil.rmtree(out / "eval", ignore_errors=True)  # its images came from the ControlNet just replaced
    run(
        stage("evaluation"),
        [
            "innercontrol.evaluate",
            *common,
            "--controlnet",
            str(out / "train" / "controlnet"),
            "--metrics",
            metrics,
            "--probe",
            str(out / "probe"),
        ],
    )
    if args.model == "mini":
        summary = write_summary(out, miniature)
        print("\n" + summary)
    print(
        f"\ndemo finished in {time.time() - start:.0f} s. Outputs under {out}:\n"
        + (
            f"  floor, ControlNet, ceiling   {out / 'summary.md'} (grid: {out / 'summary_grid.png'})\n"
            if args.model == "mini"
            else ""
        )
        + f"  probe accuracy vs timestep  {out / 'probe' / 'probe_accuracy.md'} (and .png)\n"
        f"  training logs / checkpoints {out / 'train'} (validation grids in {out / 'train' / 'validation'})\n"
        f"  trained ControlNet          {out / 'train' / 'controlnet'} (EMA: controlnet_ema)\n"
        f"  evaluation report           {out / 'eval' / 'report.md'} (metrics.json, grid.png, per_sample.csv)"
    )


# ---------------------------------------------------------------------------------------------------------------
# The miniature's summary: floor, trained ControlNet and ceiling on the same held-out controls, prompts and seeds.


def summary_table(floor: dict, trained: dict) -> list[str]:
    rows = [
        ("depth RMSE vs the control (lower is better)", "rmse", 2),
        ("CLIP score, mini CLIP (higher is better)", "clip_score", 2),
        ("FID on mini-CLIP features (lower is better)", "fid", 2),
    ]
    lines = ["| measure | floor: base, no ControlNet | InnerControl ControlNet | ceiling: real scenes |"]
    lines.append("| --- | ---: | ---: | ---: |")
    for label, key, digits in rows:
        cells = [floor.get(key), trained.get(key), trained.get(f"real_images_{key}")]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.{digits}f}" for v in cells) + " |")
    return lines


def write_summary(out: Path, miniature: Path) -> str:
    floor = json.loads((out / "eval_floor" / "metrics.json").read_text())
    trained = json.loads((out / "eval" / "metrics.json").read_text())
    ratio = trained["rmse"] / floor["rmse"] if floor.get("rmse") else float("nan")
    lines = [
        "# Demo on the miniature: floor, ControlNet, ceiling",
        "",
        f"Made by `python -m innercontrol.demo --out {out}` with the miniature `{miniature}` (configs/mini.yaml). "
        f"{trained['num_samples']} held-out scenes (seed 1, never seen by the miniature's pretraining or by this "
        "ControlNet), the same prompts, controls and seeds in every column. Numbers on the miniature say nothing "
        "about SD1.5.",
        "",
        *summary_table(floor, trained),
        "",
        f"ControlNet depth RMSE / floor: {ratio:.3f} (the issue's target: at most 0.5). The ceiling is the depth "
        "model's error on the real scenes against their exact depth: what a perfectly controlled image would score.",
        "",
        f"Probe accuracy vs timestep: `{out / 'probe' / 'probe_accuracy.md'}`; probe readout across sampling steps: "
        f"`{out / 'eval' / 'probe_readout.md'}`.",
        "",
    ]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    summary_grid(out, trained["num_samples"])
    return text


def summary_grid(out: Path, num_samples: int, scale: int = 3) -> Path:
    """Rows: control | base alone | its depth | ControlNet | its depth | real scene (depth re-extracted by the
    evaluation's depth model; the first GRID_ROWS held-out samples)."""
    from PIL import Image, ImageDraw

    from innercontrol.report import GRID_ROWS, LABEL_HEIGHT, image_path

    rows = min(GRID_ROWS, num_samples)
    columns = ["control", "base alone", "its depth", "ControlNet", "its depth", "real scene"]
    first = Image.open(out / "eval" / "controls" / "0.png")
    cell = first.width * scale
    grid = Image.new("RGB", (cell * len(columns), LABEL_HEIGHT + cell * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((c * cell + 3, 2), name, fill="black")
    for r in range(rows):
        paths = [
            out / "eval" / "controls" / f"{r}.png",
            image_path(out / "eval_floor", 0, r),
            out / "eval_floor" / "reextracted" / f"{r}.png",
            image_path(out / "eval", 0, r),
            out / "eval" / "reextracted" / f"{r}.png",
            out / "eval" / "real" / f"{r}.png",
        ]
        for c, path in enumerate(paths):
            if path.is_file():
                image = Image.open(path).convert("RGB").resize((cell, cell), Image.NEAREST)
                grid.paste(image, (c * cell, LABEL_HEIGHT + r * cell))
    grid.save(out / "summary_grid.png")
    return out / "summary_grid.png"


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    run_cli(main)
