import json
from pathlib import Path

import pytest
import torch

from innercontrol.train_probes import CollapsedProbeError, balanced_mse

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
        f"logging.output_dir={ws['root'] / (name + '_run')}",
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


def test_probe_training_writes_probe_and_accuracy_table(probe_ws):
    from innercontrol.probes import load_probe

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
    assert (probe_ws["root"] / "probe_run" / "checkpoints" / "checkpoint-12" / "training_state.json").is_file()


def test_collapsed_probe_is_reported_and_not_saved_as_good(probe_ws):
    # A threshold no probe output can reach marks the probe as collapsed.
    with pytest.raises(
        CollapsedProbeError, match=r"collapsed.*saved to .*collapsed_probe.collapsed.*probe.loss=balanced"
    ):
        _run(_args(probe_ws, "collapsed_probe", "probe.collapse_std=100"))
    assert not (probe_ws["root"] / "collapsed_probe").exists()
    assert (probe_ws["root"] / "collapsed_probe.collapsed" / "probe_accuracy.md").is_file()
