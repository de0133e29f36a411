"""The miniature's shared machinery: the scene bank cache and the resumable training stage."""

import json
import math

import numpy as np
import pytest
import torch

from innercontrol.mini.scenes import SceneBank, banks
from innercontrol.mini.stage import Stage, done_report, mark_done, warmup_cosine
from innercontrol.synthetic import render_scene


def test_scene_bank_renders_caches_and_rerenders_on_other_settings(tmp_path):
    bank = SceneBank.load_or_render(tmp_path / "bank.npz", num=3, resolution=32, seed=5)
    image, depth, caption = render_scene(2, 32, 5)
    assert torch.equal(bank.images[2], torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(bank.depth[2, 0], torch.from_numpy(np.round(depth * 255).astype(np.uint8)))
    assert bank.captions[2] == caption
    images, depth01, captions = bank.batch([2, 0])
    assert images.min() >= -1 and images.max() <= 1 and depth01.max() <= 1 and captions[0] == caption
    np.savez(tmp_path / "bank.npz", **{**dict(np.load(tmp_path / "bank.npz")), "captions": json.dumps(["x"] * 3)})
    assert SceneBank.load_or_render(tmp_path / "bank.npz", num=3, resolution=32, seed=5).captions == ["x"] * 3  # cached
    other = SceneBank.load_or_render(tmp_path / "bank.npz", num=3, resolution=32, seed=6)  # other settings: rendered
    assert other.captions[0] == render_scene(0, 32, 6)[2]
    antialiased = SceneBank.load_or_render(tmp_path / "bank.npz", num=3, resolution=32, seed=6, supersample=2)
    assert torch.equal(
        antialiased.images[1], torch.from_numpy(render_scene(1, 32, 6, supersample=2)[0]).permute(2, 0, 1)
    )
    train, held_out = banks(tmp_path, 4, 4, 32, seed=0)
    assert not any(torch.equal(a, b) for a in train.images for b in held_out.images)  # held-out never trained on


def test_warmup_cosine_by_hand():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.1)


def _regression(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1)


def _step_fn(model, interrupt_at=None):
    def step(step_index, generator):
        if step_index == interrupt_at:
            raise KeyboardInterrupt
        x = torch.randn(8, 4, generator=generator)
        return {"loss": (model(x) - 0.5 * x.sum(dim=1, keepdim=True)).pow(2).mean()}

    return step


def test_interrupted_stage_resumes_exactly_and_logs(tmp_path):
    def stage(folder, model):
        return Stage(
            "s", folder, model, lr=0.05, max_steps=6, warmup=2, checkpoint_every=1, log_every=3, progress=False
        )

    straight = _regression()
    stage(tmp_path / "a", straight).run(_step_fn(straight))
    interrupted = _regression()
    with pytest.raises(KeyboardInterrupt):
        stage(tmp_path / "b", interrupted).run(_step_fn(interrupted, interrupt_at=4))
    resumed = _regression(seed=1)  # other initial weights: the checkpoint must replace them
    second = stage(tmp_path / "b", resumed)
    second.run(_step_fn(resumed))
    assert second.step == 6
    torch.testing.assert_close(resumed.weight, straight.weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.bias, straight.bias, rtol=0, atol=0)
    rows = (tmp_path / "b" / "s" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,seconds,lr,loss") and [r.split(",")[0] for r in rows[1:]] == ["3", "6"]
    assert not (tmp_path / "b" / "s" / "checkpoint.pt.tmp").exists()
    assert done_report(tmp_path / "b", "s") == {}
    mark_done(tmp_path / "b", "s", {"quality": 1.5})
    done = json.loads((tmp_path / "b" / "s" / "done.json").read_text())
    assert done_report(tmp_path / "b", "s") == done and done["steps"] == 6 and done["quality"] == 1.5


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path):
    model = _regression()
    stage = Stage("s", tmp_path, model, lr=0.05, max_steps=4, warmup=1, checkpoint_every=1, progress=False)

    def step(step_index, generator):
        value = float("nan") if step_index == 2 else 1.0
        return {"loss": model.weight.sum() * 0 + value}

    with pytest.raises(FloatingPointError, match="step 2"):
        stage.run(step)
    assert torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)["step"] == 2
