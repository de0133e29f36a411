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
    floor_cfg = small_config(tiny_dir, eval_set, eval_dir)  # two prompts, 2 UniPC steps, 128 px
    ev.evaluate(floor_cfg, "none", {"control"}, Accelerator(cpu=True))
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
    samples = json.loads((eval_dir / "eval_set.json").read_text())["samples"]
    real = ev.load_images([eval_dir / "real" / f"{i}.png" for i in range(2)])

    def direct(strength):
        """diffusers' img2img images for strength, and the timesteps it ran (recorded as it runs them)."""
        ran = []

        def record(pipeline, step, timestep, kwargs):
            ran.append(int(timestep))
            return kwargs

        images = pipe(
            prompt=[s["caption"] for s in samples],
            image=real,
            strength=strength,
            negative_prompt=["worst quality, low quality"] * 2,  # the eval's default
            num_inference_steps=2,
            guidance_scale=7.5,  # configs/tiny.yaml's
            generator=[torch.Generator().manual_seed(ev.image_seed(42, i, 0)) for i in range(2)],
            output_type="np",
            callback_on_step_end=record,
        ).images
        return images, ran

    images, ran = direct(0.5)
    assert len(ran) == 1 and scores["0.5"]["first_timestep"] == ran[0]  # int(2 * 0.5) = 1 step: the last one
    _, ran_whole = direct(1.0)
    assert len(ran_whole) == 2 and scores["1"]["first_timestep"] == ran_whole[0] > ran[0]
    level = work / "strength_0.5"
    ours = np.stack(
        [np.asarray(Image.open(level / "images" / "group_0" / f"{i}.png"), dtype=np.float64) / 255 for i in range(2)]
    )
    assert np.abs(ours - images).max() <= 1 / 255 + 1e-6

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

    # A rerun generates nothing; an interrupted level (one image and its scores missing) makes only that image.
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*.png")}
    lb.main(command)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.png")} == before
    (level / "images" / "group_0" / "1.png").unlink()
    kept = json.loads((work / "scores.json").read_text())
    del kept["levels"]["0.5"]
    (work / "scores.json").write_text(json.dumps(kept))
    lb.main(command)
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*.png")}
    assert [p for p in after if after[p] != before.get(p)] == [level / "images" / "group_0" / "1.png"]
    again = json.loads((work / "scores.json").read_text())["levels"]["0.5"]["scores"]["rmse"]["per_image"]
    assert again == pytest.approx(independent.tolist(), rel=1e-5)

    # --report-only rewrites the report from disk; other settings in the same --work are refused; bad arguments
    # name the fix.
    (out / "LAYOUT_BOUND.md").unlink()
    lb.main(command + ["--report-only"])
    assert (out / "LAYOUT_BOUND.md").read_text() == report
    with pytest.raises(ConfigError, match="holds images of other settings .*guidance_scale: 7.5 on disk, 3.0 now"):
        lb.main(command + ["eval.guidance_scale=3.0"])
    with pytest.raises(ConfigError, match="holds no scores yet"):
        lb.main(command + ["--work", str(tmp_path / "empty"), "--report-only"])
    with pytest.raises(ConfigError, match=r"every strength must lie in \(0, 1\]"):
        lb.main(command[: -len(args)] + ["--strengths", "0,0.5"] + args)
    with pytest.raises(ConfigError, match=r"0.4 runs no sampling step with eval.num_inference_steps=2"):
        lb.main(command[: -len(args)] + ["--strengths", "0.4,1"] + args)
    with pytest.raises(ConfigError, match="holds no finished evaluation"):
        lb.main(
            [
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--eval-dir",
                str(tmp_path / "none"),
                "--strengths",
                "1",
                *args,
            ]
        )
    with pytest.raises(ConfigError, match="--compare 'floor'"):
        lb.main(command + ["--compare", "floor"])
