"""bench/layout_bound.py on the tiny random models: its images are diffusers' img2img images, its scores the
evaluation's metric computed here directly, and a rerun generates nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from innercontrol import evaluate as ev
from innercontrol import metrics
from innercontrol.config import ConfigError

from .helpers import load_bench_script
from .test_evaluate import reference_pipeline, small_config, write_eval_set

ROOT = Path(__file__).resolve().parents[1]


def test_sdedit_levels_match_diffusers_and_the_metric_and_resume(tiny_dir, tmp_path, capsys):
    from accelerate import Accelerator
    from diffusers import StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler

    from innercontrol.conditions import get_condition

    lb = load_bench_script("layout_bound")
    eval_set, eval_dir, work, out = (
        write_eval_set(tmp_path / "set"),
        tmp_path / "eval",
        tmp_path / "work",
        tmp_path / "out",
    )
    overrides = small_config(tiny_dir, eval_set, eval_dir)  # two prompts, 2 UniPC steps, 128 px
    ev.evaluate(overrides, "none", {"control"}, Accelerator(cpu=True))
    args = [f"{k}={v}" for k, v in {
        "model.pretrained_model": tiny_dir, "condition.name": "depth", "condition.eval_model": tiny_dir / "dpt",
        "eval.dataset": eval_set, "eval.split": "validation", "eval.control_column": "control_depth",
        "eval.output_dir": eval_dir, "eval.resolution": 128, "eval.num_inference_steps": 2, "eval.batch_size": 2,
        "eval.max_samples": 2, "eval.images_per_prompt": 1,
    }.items()]  # fmt: skip
    command = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--eval-dir", str(eval_dir), "--work", str(work)]
    command += ["--out", str(out), "--strengths", "1.0,0.5", "--compare", f"floor={eval_dir}", *args]
    lb.main(command)

    scores = json.loads((work / "scores.json").read_text())["levels"]
    assert sorted(scores) == ["0.5", "1"]
    pipe = reference_pipeline(StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler, tiny_dir)
    pipe.scheduler.set_timesteps(2)
    assert scores["0.5"]["first_timestep"] == int(pipe.scheduler.timesteps[1])  # int(2 * 0.5) = 1 step: the last
    assert scores["1"]["first_timestep"] == int(pipe.scheduler.timesteps[0])

    samples = json.loads((eval_dir / "eval_set.json").read_text())["samples"]
    real = ev.load_images([eval_dir / "real" / f"{i}.png" for i in range(2)])
    direct = pipe(
        prompt=[s["caption"] for s in samples],
        image=real,
        strength=0.5,
        negative_prompt=["worst quality, low quality"] * 2,  # the eval's default
        num_inference_steps=2,
        guidance_scale=7.5,  # configs/tiny.yaml's
        generator=[torch.Generator().manual_seed(ev.image_seed(42, i, 0)) for i in range(2)],
        output_type="np",
    ).images
    level = work / "strength_0.50"
    ours = np.stack(
        [np.asarray(Image.open(level / "images" / "group_0" / f"{i}.png"), dtype=np.float64) / 255 for i in range(2)]
    )
    assert np.abs(ours - direct).max() <= 1 / 255 + 1e-6

    depth = get_condition("depth", str(tiny_dir / "dpt"), purpose="eval")
    controls = ev.load_images([eval_dir / "controls" / f"{i}.png" for i in range(2)])
    independent = metrics.depth_rmse(
        depth.predict_depth(ev.load_images([level / "images" / "group_0" / f"{i}.png" for i in range(2)])), controls
    )
    assert scores["0.5"]["scores"]["rmse"]["per_image"] == pytest.approx(independent.tolist(), rel=1e-5)
    assert scores["0.5"]["scores"]["rmse"]["mean"] == pytest.approx(independent.mean().item(), rel=1e-5)

    report = (out / "LAYOUT_BOUND.md").read_text()
    floor = json.loads((eval_dir / "metrics.json").read_text())["rmse"]
    assert f"| 0.5 | {scores['0.5']['first_timestep']} | {scores['0.5']['scores']['rmse']['mean']:.2f} |" in report
    assert f"| floor | {floor:.2f} |" in report and (out / "layout_bound.png").is_file()

    # A rerun generates nothing; other settings in the same --work are refused; bad arguments name the fix.
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*.png")}
    lb.main(command)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.png")} == before
    with pytest.raises(ConfigError, match="holds scores of other settings"):
        lb.main(command + ["eval.guidance_scale=3.0"])
    with pytest.raises(ConfigError, match=r"every strength must lie in \(0, 1\]"):
        lb.main(command[: -len(args)] + ["--strengths", "0,0.5"] + args)
    with pytest.raises(ConfigError, match="holds no finished evaluation"):
        lb.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--eval-dir", str(tmp_path / "none"), *args])
    with pytest.raises(ConfigError, match="--compare 'floor'"):
        lb.main(command + ["--compare", "floor"])
