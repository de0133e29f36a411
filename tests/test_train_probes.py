import json
from pathlib import Path

import pytest
import torch

from innercontrol.train_probes import CollapsedProbeError, FailedProbeError, balanced_mse

from .helpers import record_instances

ROOT = Path(__file__).resolve().parents[1]


def test_balanced_mse_by_hand():
    target = torch.zeros(1, 3, 2, 2)
    target[..., 0, 0] = 1.0  # one edge pixel out of four
    prediction = torch.full_like(target, 0.25)
    # edge pixel error (0.75^2), background error (0.25^2): averaged with equal weight
    assert balanced_mse(prediction, target).item() == pytest.approx((0.75**2 + 0.25**2) / 2)
    # plain MSE weights the background three times as much
    assert torch.nn.functional.mse_loss(prediction, target).item() == pytest.approx((0.75**2 + 3 * 0.25**2) / 4)
    # no edge at all: background term only
    assert balanced_mse(prediction, torch.zeros_like(target)).item() == pytest.approx(0.25**2)


@pytest.fixture(scope="module")
def probe_ws(tiny_dir, tmp_path_factory):
    from innercontrol.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("probe_ws")
    write_synthetic(root / "synthetic", num=40, resolution=64, seed=0, val_fraction=0.2)
    return {"tiny": tiny_dir, "data": root / "synthetic", "root": root}


def _args(ws, name, *extra):
    return [
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"model.pretrained_model={ws['tiny']}",
        f"condition.reward_model={ws['tiny']}/dpt",
        f"data.dataset={ws['data']}",
        "data.resolution=64",
        f"eval.dataset={ws['data']}",
        "eval.resolution=64",
        f"probe.path={ws['root'] / name}",
        f"probe.output_dir={ws['root'] / (name + '_run')}",
        "probe.max_steps=12",
        "probe.batch_size=4",
        "probe.eval_samples=6",
        "logging.checkpoint_every=6",
        *extra,
    ]


def _run(args):
    from accelerate.state import AcceleratorState, GradientState

    from innercontrol import train_probes

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_probes.main(args)


def test_probe_training_writes_probe_and_accuracy_table(probe_ws, monkeypatch):
    from innercontrol import train_probes
    from innercontrol.probes import load_probe

    # 12 steps leave the probe worse than the mean map (test_probe_no_better_than_mean_map_is_reported_as_failed);
    # calling every margin a tie lets this test follow the path of a good probe.
    monkeypatch.setattr(train_probes, "TIE_SE", 1e9)
    _run(_args(probe_ws, "probe"))
    folder = probe_ws["root"] / "probe"
    probe = load_probe(folder)
    assert probe.config.tap == "conv" and probe.config.condition == "depth" and probe.config.extra["steps"] == 12
    rows = json.loads((folder / "probe_accuracy.json").read_text())
    assert [(r["t_low"], r["t_high"]) for r in rows] == [(s, s + 99) for s in range(0, 1000, 100)]
    assert all(r["probe_mse"] > 0 and r["mean_map_mse"] > 0 for r in rows)
    table = (folder / "probe_accuracy.md").read_text()
    assert "| 0-99 |" in table and "| 900-999 |" in table
    assert (folder / "probe_accuracy.png").stat().st_size > 1000
    state = json.loads(
        (probe_ws["root"] / "probe_run" / "checkpoints" / "checkpoint-12" / "training_state.json").read_text()
    )
    assert state["job"] == "train_probes" and state["run_id"] == probe.config.extra["run_id"]


def test_latent_cache_trains_the_same_probe_encoding_each_row_once(probe_ws, monkeypatch):
    """optim.latent_cache in probe training: 12 steps of 4 rows (the 32 training rows, then 16 again) give the probe
    and accuracy table that encoding every batch gives; the VAE encodes each training row once, and the held-out
    images once for all timestep buckets."""
    from safetensors.torch import load_file

    from innercontrol import train_probes

    caches = record_instances(monkeypatch, train_probes, "LatentCache")
    monkeypatch.setattr(train_probes, "TIE_SE", 1e9)  # as in the test above: the 12-step probe is saved as good
    _run(_args(probe_ws, "every_batch"))
    assert [(c.max_entries, c.misses, c.hits) for c in caches] == [(6, 6, 54)]  # held out: 6 images, 10 buckets
    _run(_args(probe_ws, "cached", "optim.latent_cache=64"))
    assert [(c.max_entries, c.misses, c.hits) for c in caches[1:]] == [(64, 32, 16), (6, 6, 54)]
    every, cached = (load_file(probe_ws["root"] / name / "probe.safetensors") for name in ("every_batch", "cached"))
    assert every.keys() == cached.keys()
    assert all(torch.equal(every[key], cached[key]) for key in every)
    rows = [
        json.loads((probe_ws["root"] / name / "probe_accuracy.json").read_text()) for name in ("every_batch", "cached")
    ]
    assert [row["probe_mse"] for row in rows[0]] == [row["probe_mse"] for row in rows[1]]


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_probe_pretraining_and_controlnet_training_keep_apart(config):
    from innercontrol.config import load_config

    cfg = load_config(str(config))
    assert Path(cfg.probe.output_dir).resolve() != Path(cfg.logging.output_dir).resolve()


def test_fresh_probe_run_over_another_runs_probe_stops_before_touching_it(probe_ws, tiny_dir):
    from diffusers import UNet2DConditionModel

    from innercontrol.checkpoints import OutputFolderError
    from innercontrol.controlled_unet import tapped_channels
    from innercontrol.probes import build_probe

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    old = probe_ws["root"] / "old_probe"
    build_probe(tapped_channels(unet, "conv"), 16, 64, tap="conv").save_pretrained(old)
    (probe_ws["root"] / "old_probe_run").mkdir()
    (probe_ws["root"] / "old_probe_run" / "config.yaml").write_text("seed: 0\n")
    before = {p: p.stat().st_mtime_ns for p in probe_ws["root"].rglob("*") if "old_probe" in str(p)}
    with pytest.raises(OutputFolderError) as refused:
        _run(_args(probe_ws, "old_probe"))
    message = str(refused.value)
    for found in (
        old / "probe_config.json",
        old / "probe.safetensors",
        probe_ws["root"] / "old_probe_run" / "config.yaml",
    ):
        assert str(found) in message
    for advice in ("logging.resume=latest", "probe.output_dir=DIR probe.path=DIR", "logging.overwrite=true"):
        assert advice in message
    assert {p: p.stat().st_mtime_ns for p in probe_ws["root"].rglob("*") if "old_probe" in str(p)} == before


def test_collapsed_probe_is_reported_and_not_saved_as_good(probe_ws):
    # A threshold no probe output can reach marks the probe as collapsed.
    with pytest.raises(
        CollapsedProbeError, match=r"collapsed.*saved to .*collapsed_probe.collapsed.*probe.loss=balanced"
    ):
        _run(_args(probe_ws, "collapsed_probe", "probe.collapse_std=100"))
    assert not (probe_ws["root"] / "collapsed_probe").exists()
    assert (probe_ws["root"] / "collapsed_probe.collapsed" / "probe_accuracy.md").is_file()


def test_probe_batch_is_global_and_divided_over_processes():
    """probe.batch_size is the global batch (Readout Guidance: 8 on one device): 8 processes of train/config.yml
    read 1 sample each, not 8."""
    from innercontrol.config import ConfigError
    from innercontrol.train_probes import per_process_batch

    assert per_process_batch(8, 1) == 8 and per_process_batch(8, 8) == 1 and per_process_batch(8, 2) == 4
    with pytest.raises(ConfigError, match=r"probe.batch_size=8 .* 3 processes"):
        per_process_batch(8, 3)


def test_probe_no_better_than_mean_map_is_reported_as_failed(probe_ws):
    # One step leaves the probe near its random initialisation: worse than predicting the mean control map.
    with pytest.raises(FailedProbeError, match=r"probe failed.*mean control map.*saved to .*weak_probe.failed"):
        _run(_args(probe_ws, "weak_probe", "probe.max_steps=1", "probe.collapse_std=0"))
    assert not (probe_ws["root"] / "weak_probe").exists()
    table = (probe_ws["root"] / "weak_probe.failed" / "probe_accuracy.md").read_text()
    overall = next(line for line in table.splitlines() if line.startswith("| **all (0-999)** |"))
    assert overall.endswith("| no |") and "+-" in overall
