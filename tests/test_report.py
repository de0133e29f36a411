"""Reports that do not oversell: tiny random weights labelled, margins with their noise, baselines, grid labels."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from innercontrol import report
from innercontrol.config import load_config
from innercontrol.tiny import TINY_MARKER, is_tiny
from innercontrol.train_probes import beats_mean_map, overall_margin, paired_margin, write_accuracy_report

RESULTS = {"rmse": 27.0, "fid": 12.5, "clip_score": 31.0, "num_samples": 8}


def test_tiny_results_are_labelled_and_not_bolded_beside_published(tiny_dir, tmp_path):
    assert (tiny_dir / TINY_MARKER).is_file() and is_tiny(tiny_dir) and not is_tiny(tmp_path)
    cfg = load_config(None, ["condition.name=depth", f"model.pretrained_model={tiny_dir}"])
    text = report.report_markdown(cfg, {**RESULTS, "settings": {"controlnet": "c", "pretrained_model": "m"}})
    assert "**ours**" not in text and "| ours (tiny random weights) | 27.00 | 12.50 | 31.00 |" in text
    assert "Tiny random-weight models" in text and "not comparable" in text
    # The published rows come after ours, in their own table under a "for reference only" line.
    ours, reference = text.index("| ours (tiny"), text.index("for reference only")
    assert ours < reference < text.index("| InnerControl (published) | 26.09 | 18.29 | 31.97 |")
    # Real weights (a hub id here) keep the plain comparison table.
    real = load_config(None, ["condition.name=depth"])
    text = report.report_markdown(real, {**RESULTS, "settings": {"controlnet": "c", "pretrained_model": "m"}})
    assert "| **ours** | 27.00 | 12.50 | 31.00 |" in text and "tiny random" not in text


def test_margins_are_paired_and_ties_are_called_ties(tmp_path):
    # Hand-computed: differences 1, 2, 3, 6 -> mean 3, sample variance 14/3, standard error sqrt(14/3/4).
    mean, se = paired_margin([1.0, 2.0, 3.0, 6.0])
    assert mean == pytest.approx(3.0) and se == pytest.approx((14 / 3 / 4) ** 0.5)
    assert paired_margin([-1.0]) == (-1.0, float("inf"))
    assert beats_mean_map(-0.3, 0.1) == "yes" and beats_mean_map(-0.1, 0.1) == "tie"
    assert beats_mean_map(0.15, 0.1) == "tie" and beats_mean_map(0.3, 0.1) == "no"

    # Bucket 0-99: the probe is better on every sample, by 0.002 +- 0.0001 -> yes. Bucket 100-199: better by 0.4% on
    # average but noisy -> tie (the old table said "yes").
    clear = [-0.0021, -0.0019, -0.0020, -0.0020]
    noisy = [0.004, -0.004, 0.0039, -0.0041]
    rows = []
    for low, differences in ((0, clear), (100, noisy)):
        mean_map = 0.014
        rows.append(
            {
                "t_low": low,
                "t_high": low + 99,
                "probe_mse": mean_map + sum(differences) / 4,
                "mean_map_mse": mean_map,
                "difference": paired_margin(differences)[0],
                "difference_se": paired_margin(differences)[1],
                "per_sample_difference": differences,
            }
        )
    assert rows[1]["probe_mse"] < rows[1]["mean_map_mse"]
    write_accuracy_report(tmp_path, rows, "header")
    lines = (tmp_path / "probe_accuracy.md").read_text().splitlines()
    row0 = next(line for line in lines if line.startswith("| 0-99 |"))
    row1 = next(line for line in lines if line.startswith("| 100-199 |"))
    assert row0.endswith("| yes |") and "-0.00200 +- 0.00004" in row0
    assert row1.endswith("| tie |")
    # Overall: each sample's difference averaged over the two buckets first.
    per_sample = [(a + b) / 2 for a, b in zip(clear, noisy)]
    assert overall_margin(rows) == pytest.approx(paired_margin(per_sample))
    overall = next(line for line in lines if line.startswith("| **all (0-199)** |"))
    assert overall.endswith("| tie |") and beats_mean_map(*paired_margin(per_sample)) == "tie"


def cell_file(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (value, value, value)).save(path)


def test_grids_carry_column_labels(tmp_path):
    cfg = load_config(None, ["eval.images_per_prompt=2", "eval.resolution=64"])
    for index in range(2):
        cell_file(tmp_path / "controls" / f"{index}.png", 128)
        for group in range(2):
            cell_file(report.image_path(tmp_path, group, index), 128)
        cell_file(tmp_path / "reextracted" / f"{index}.png", 128)
    grid = np.asarray(Image.open(report.make_grid(cfg, tmp_path, 2)).convert("L"))
    strip = grid.shape[0] - 2 * 64
    assert grid.shape[1] == 4 * 64 and strip >= 10
    for column in range(4):  # each column's label: dark text on white above its cells
        label = grid[:strip, column * 64 : (column + 1) * 64]
        assert label.max() == 255 and label.min() < 100
        assert grid[strip + 32, column * 64 + 32] == 128


def test_validation_grid_carries_column_labels(tiny_dir):
    from diffusers import ControlNetModel

    from innercontrol.models import load_stable_diffusion
    from innercontrol.train import validation_grid

    cfg = load_config(None, [f"model.pretrained_model={tiny_dir}", "data.resolution=64", "eval.num_inference_steps=1"])
    sd = load_stable_diffusion(cfg.model)
    controlnet = ControlNetModel.from_pretrained(tiny_dir / "controlnet")
    controls = torch.full((1, 3, 64, 64), 0.5)
    grid = validation_grid(cfg, sd, controlnet, None, controls, ["a red circle"], torch.device("cpu"), torch.float32)
    strip = grid.height - 64
    assert grid.width == 2 * 64 and strip >= 10
    pixels = np.asarray(grid.convert("L"))
    for column in range(2):
        label = pixels[:strip, column * 64 : (column + 1) * 64]
        assert label.max() == 255 and label.min() < 100


def test_readout_report_and_plot_show_the_mean_map_baseline(tmp_path, monkeypatch):
    table = [
        {"step": s, "timestep": 999 - 333 * s, "probe_mse": 0.02 - 0.004 * s, "mean_map_mse": 0.015} for s in range(3)
    ]
    plotted = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda ax, *a, **k: plotted.append((a, k)) or original(ax, *a, **k)
    )
    report.write_readout(tmp_path, table, "probe", 3)
    assert "| 0 | 999 | 0.02000 | 0.01500 |" in (tmp_path / "probe_readout.md").read_text()
    with (tmp_path / "probe_readout.csv").open() as f:
        assert [float(row["mean_map_mse"]) for row in csv.DictReader(f)] == [0.015] * 3
    baseline = [args for args, kwargs in plotted if kwargs.get("label") == "mean control map"]
    assert len(baseline) == 1 and list(baseline[0][1]) == [0.015] * 3
