"""bench/method_comparison.py end to end on the tiny random models: two arms, one seed, two steps evaluated after each
(the machinery only: random weights say nothing about the methods)."""

import csv
import json
import math

import pytest
import torch

from .helpers import load_bench_script

pytestmark = pytest.mark.slow


def test_two_arms_end_to_end_resumable_with_paired_differences(tiny_dir, tmp_path, capsys):
    import shutil

    from diffusers import UNet2DConditionModel
    from scipy import stats

    from innercontrol.controlled_unet import tapped_channels
    from innercontrol.probes import build_probe

    mc = load_bench_script("method_comparison")
    work, out = tmp_path / "work", tmp_path / "report"
    shutil.copytree(tiny_dir, work / "tiny")  # the script's own tiny pipeline, made once here
    # A random probe for the tiny UNet's ResNet taps (configs/tiny.yaml): a few probe steps on random weights do
    # not beat the mean map, which train_probes rightly refuses; the machinery needs only a probe that loads.
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    torch.manual_seed(0)
    build_probe(
        tapped_channels(unet, "conv"), 32, unet.time_embedding.linear_2.out_features, tap="conv"
    ).save_pretrained(tmp_path / "probe")
    argv = ["--model", "tiny", "--preset", "smoke", "--arms", "plain,innercontrol", "--work", str(work)]
    argv += ["--out", str(out), "--probe", str(tmp_path / "probe")]
    mc.main(argv)
    first = capsys.readouterr().out
    assert "plain, seed 0: train to step 1" in first and "innercontrol, seed 0: evaluate step 2" in first
    # Every arm starts from the one warm start (seed 1000, the smoke preset's single step), recorded in each run.
    assert "warm start: innercontrol, seed 1000, 1 steps" in first and "warm start: evaluate" in first
    start = {"steps": 1, "arm": "innercontrol", "seed": 1000}
    assert json.loads((work / "runs" / "plain_seed0" / "init.json").read_text()) == start
    assert (
        str(work / "init_innercontrol_1" / "controlnet") in (work / "runs" / "plain_seed0" / "config.yaml").read_text()
    )

    runs = mc.collect(work)
    assert sorted(runs) == ["innercontrol", "plain"] and sorted(runs["plain"][0]) == [1, 2]
    report = (out / "METHODS.md").read_text()
    assert "| (a) plain |" in report and "| (d) both |" in report and "| floor: base, no ControlNet |" in report
    assert "| warm start: every arm's step 0 |" in report and "| (d) both | warm start |" in report
    assert (out / "method_curves.png").is_file() and (out / "method_readout.png").is_file()
    for arm in ("plain", "innercontrol"):
        assert (work / "runs" / f"{arm}_seed0" / "readout" / "probe_readout.csv").is_file()

    # The paired difference in the report, recomputed from the per-sample files.
    def rmse(arm):
        with (work / "runs" / f"{arm}_seed0" / "eval" / "step-000002" / "per_sample.csv").open() as f:
            rows = list(csv.DictReader(f))
        by_index = {}
        for row in rows:
            by_index.setdefault(int(row["index"]), []).append(float(row["rmse"]))
        return {i: sum(v) / len(v) for i, v in by_index.items()}

    a, d = rmse("plain"), rmse("innercontrol")
    diffs = [d[i] - a[i] for i in sorted(a)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1))
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    assert f"| (d) both | (a) plain | {mean:+.2f} | [{mean - half:+.2f}, {mean + half:+.2f}] |" in report
    assert mc.paired_interval([1.0, 3.0]) == pytest.approx((2.0, stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2)))

    # Rerunning runs nothing: every segment, evaluation and readout is on disk.
    mc.main(argv)
    assert "===" not in capsys.readouterr().out

    # A comparison from another start never continues these runs.
    with pytest.raises(SystemExit, match="started from"):
        mc.main([*argv, "--init-steps", "0"])
