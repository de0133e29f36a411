"""The embedded tiny default, end to end, offline on the CPU (what `make demo` runs; a few minutes).

    python -m innercontrol.demo --out outputs/demo

Stages, each the real entry point with configs/tiny.yaml (paths re-pointed under --out):
  1. python -m innercontrol.tiny          tiny SD1.5-shaped pipeline + tiny DPT depth model + tiny CLIP
  2. python -m innercontrol.synthetic     synthetic depth scenes with exact depth maps (train / validation)
  3. python -m innercontrol.train_probes  probe pretraining + probe accuracy vs timestep table and plot
  4. python -m innercontrol.train         InnerControl training (diffusion + reward + alignment)
  5. python -m innercontrol.evaluate      generation, depth RMSE, CLIP score, report; probe readout
The tiny models have random weights (the DPT reward model too), so the numbers exercise the machinery: they say
nothing about SD1.5. FID is skipped (clean-fid's Inception weights need a download).
Running it again starts over: the training stages pass logging.overwrite=true and the evaluation folder is
cleared, replacing the earlier demo's runs (evaluation refuses to mix images of other weights in one folder).
Paths under the working directory are passed relative, so the reports carry no absolute path of this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def shown(path: Path) -> Path:
    """`path` relative to the working directory when it lies under it (commands in reports stay portable)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def path_overrides(out: Path) -> list[str]:
    tiny = out / "tiny"
    return [
        f"model.pretrained_model={tiny}",
        f"model.controlnet={tiny}/controlnet",
        f"condition.reward_model={tiny}/dpt",
        f"condition.eval_model={tiny}/dpt",
        f"data.dataset={out / 'synthetic'}",
        f"eval.dataset={out / 'synthetic'}",
        f"eval.clip_model={tiny}/clip",
        f"probe.path={out / 'probe'}",
        f"eval.output_dir={out / 'eval'}",
    ]


def run(stage: str, args: list[str]) -> None:
    print(f"\n=== {stage}: python -m {' '.join(args[:1])} ...", flush=True)
    start = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", *args], check=True, env=env)
    print(f"=== {stage} done in {time.time() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="folder for every output of the demo")
    parser.add_argument("--num-images", type=int, default=480, help="synthetic scenes (10%% held out)")
    parser.add_argument("--probe-steps", type=int, default=None, help="default: probe.max_steps of tiny.yaml")
    parser.add_argument("--train-steps", type=int, default=None, help="default: optim.max_steps of tiny.yaml")
    args = parser.parse_args(argv)
    out = shown(Path(args.out))
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    common = ["--config", str(shown(CONFIG)), *path_overrides(out)]

    run("1/5 tiny pipeline", ["innercontrol.tiny", "--out", str(out / "tiny")])
    run(
        "2/5 synthetic data",
        [
            "innercontrol.synthetic",
            "--out",
            str(out / "synthetic"),
            "--num",
            str(args.num_images),
            "--resolution",
            "128",
        ],
    )
    run(
        "3/5 probe pretraining",
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
        "4/5 aligned ControlNet training",
        [
            "innercontrol.train",
            *common,
            f"logging.output_dir={out / 'train'}",
            "logging.overwrite=true",
            *([f"optim.max_steps={args.train_steps}"] if args.train_steps else []),
        ],
    )
    shutil.rmtree(out / "eval", ignore_errors=True)  # its images came from the ControlNet just replaced
    run(
        "5/5 evaluation",
        [
            "innercontrol.evaluate",
            *common,
            "--controlnet",
            str(out / "train" / "controlnet"),
            "--metrics",
            "control,clip",
            "--probe",
            str(out / "probe"),
        ],
    )
    print(
        f"\ndemo finished in {time.time() - start:.0f} s. Outputs under {out}:\n"
        f"  probe accuracy vs timestep  {out / 'probe' / 'probe_accuracy.md'} (and .png)\n"
        f"  training logs / checkpoints {out / 'train'} (validation grids in {out / 'train' / 'validation'})\n"
        f"  trained ControlNet          {out / 'train' / 'controlnet'} (EMA: controlnet_ema)\n"
        f"  evaluation report           {out / 'eval' / 'report.md'} (metrics.json, grid.png, per_sample.csv)"
    )


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    run_cli(main)
