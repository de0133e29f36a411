"""The miniature's depth stage (innercontrol/mini/depth.py): training, resume, loss, RMSE, save and condition loading."""

import math

import pytest
import torch

from innercontrol.conditions import get_condition
from innercontrol.mini import depth
from innercontrol.mini.scenes import SceneBank

from .helpers import killed_after_first_checkpoint_then_resumed

SMOKE = depth.PRESETS["smoke"]


@pytest.fixture(scope="module")
def bank():
    return SceneBank.render(num=16, resolution=32, seed=3, progress=False)


@pytest.fixture(scope="module")
def trained(bank, tmp_path_factory):
    return depth.train(bank, SMOKE, tmp_path_factory.mktemp("depth_work"), seed=0, progress=False)


def fixed_batch_loss(model, bank):
    images, exact, _ = bank.batch(range(8))
    with torch.no_grad():
        return float(depth.depth_loss(depth.predict_depth(model, images, SMOKE["image_size"]), exact)["loss"])


def test_smoke_training_lowers_the_loss(trained, bank):
    assert not trained.training
    before = fixed_batch_loss(depth.build(SMOKE, seed=0), bank)
    after = fixed_batch_loss(trained, bank)
    assert math.isfinite(after) and after < before, (before, after)


def test_fresh_model_predicts_positive_depth_everywhere(bank):
    # The head ends in a ReLU: a prediction of 0 would pass no gradient (the default initialisation gives ~1e-8).
    images, _, _ = bank.batch(range(4))
    with torch.no_grad():
        prediction = depth.predict_depth(depth.build(SMOKE, seed=0), images, SMOKE["image_size"])
    assert prediction.shape == (4, 1, 32, 32)
    assert float(prediction.min()) > 0.1


def test_resumed_run_equals_an_uninterrupted_one(bank, trained, tmp_path, monkeypatch):
    step, resumed = killed_after_first_checkpoint_then_resumed(
        lambda work: depth.train(bank, SMOKE, work, seed=0, progress=False), tmp_path, monkeypatch
    )
    assert step == SMOKE["checkpoint_every"]
    straight = trained.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, straight[name], rtol=0, atol=1e-6, msg=name)


def test_depth_loss_by_hand():
    exact = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    prediction = torch.tensor([[[[0.5, 0.5], [2.0, 0.5]]]])
    terms = depth.depth_loss(prediction, exact)
    l1 = (0.5 + 0 + 1.0 + 0.25) / 4
    protocol = ((0.25 - 0) ** 2 + (0.25 - 0.5) ** 2 + (1 - 1) ** 2 + (0.25 - 0.25) ** 2) / 4  # pred / 2 vs label
    assert float(terms["l1"]) == pytest.approx(l1)
    assert float(terms["protocol_mse"]) == pytest.approx(protocol)
    assert float(terms["loss"]) == pytest.approx(l1 + protocol)
    assert float(depth.depth_loss(prediction, exact, protocol_weight=4.0)["loss"]) == pytest.approx(l1 + 4 * protocol)
    # A prediction proportional to the exact depth has zero protocol error.
    assert float(depth.depth_loss(3 * exact, exact)["protocol_mse"]) == pytest.approx(0.0, abs=1e-12)


class HalfDepthModel(torch.nn.Module):
    """Stand-in DPT: 'predicts' a known map, the exact depth at half scale plus a constant error of 0.1 (0-1 scale)."""

    def __init__(self, exact):
        super().__init__()
        self.exact, self.seen = exact, 0

    def forward(self, pixel_values):
        part = self.exact[self.seen : self.seen + len(pixel_values)]
        self.seen += len(pixel_values)
        return type("Output", (), {"predicted_depth": (part[:, 0] + 0.2) * 0.5})()


def test_evaluate_uses_the_rmse_protocol_on_the_exact_depth(bank):
    _, exact, _ = bank.batch(range(len(bank)))
    preset = {**SMOKE, "image_size": 32, "eval_batch_size": 5}
    result = depth.evaluate(HalfDepthModel(exact), bank, preset)
    # Per scene: prediction / its max = (d + 0.2) / (max d + 0.2); label = (d - min d) / (max d - min d), on 0-255.
    expected = []
    for scene in exact[:, 0].double():
        low, high = scene.min(), scene.max()
        pred = (scene + 0.2) / (high + 0.2) * 255
        label = (scene - low) / (high - low) * 255
        expected.append(((pred - label) ** 2).mean().sqrt())
    expected = torch.stack(expected)
    assert result["rmse"] == pytest.approx(expected.mean().item(), abs=1e-3)
    assert result["rmse_p95"] == pytest.approx(expected.quantile(0.95).item(), abs=1e-3)
    assert result["held_out_scenes"] == len(bank)


def test_saved_model_loads_as_our_depth_condition(trained, bank, tmp_path):
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    depth.save(trained, tmp_path / "dpt")
    assert isinstance(DPTForDepthEstimation.from_pretrained(tmp_path / "dpt"), DPTForDepthEstimation)
    processor = DPTImageProcessor.from_pretrained(tmp_path / "dpt")
    assert processor.size == {"height": SMOKE["image_size"], "width": SMOKE["image_size"]}
    condition = get_condition("depth", model_path=str(tmp_path / "dpt"), purpose="eval")
    assert condition.input_size == (SMOKE["image_size"],) * 2
    images, _, _ = bank.batch(range(4))
    with torch.no_grad():
        ours = depth.predict_depth(trained, images, SMOKE["image_size"], antialias=True)
        theirs = condition.predict_depth((images + 1) / 2)  # the condition takes images in [0, 1]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
