"""The miniature recipe end to end on the smoke preset: every part lands in the layout our loaders read; a rerun
resumes (nothing retrained); the model card shows the targets."""

import json

import pytest
import torch

from innercontrol import pretrain_mini

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    out, work = root / "out", root / "work"
    report = pretrain_mini.pretrain(out, work, "smoke", seed=0, progress=False)
    return out, work, report


def test_smoke_recipe_writes_every_part_in_the_hub_layout(smoke):
    from diffusers import StableDiffusionPipeline
    from omegaconf import OmegaConf

    from innercontrol.conditions import get_condition
    from innercontrol.models import load_stable_diffusion

    out, _, report = smoke
    assert {s: bool(report[s]) for s in pretrain_mini.STAGES} == {s: True for s in pretrain_mini.STAGES}
    assert report["vae"]["stage"] == "vae" and report["unet"]["steps"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    sd = load_stable_diffusion(OmegaConf.create({"pretrained_model": str(out), "revision": None, "variant": None}))
    assert len(sd.tokenizer) == 919
    depth = get_condition("depth", model_path=str(out / "dpt"), purpose="eval")
    with torch.no_grad():
        assert depth(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    saved = json.loads((out / "report.json").read_text())
    assert saved["unet"] == report["unet"] and (out / "base_samples.png").is_file()


def test_rerun_resumes_without_training_again(smoke):
    out, work, report = smoke
    steps = {s: torch.load(work / s / "checkpoint.pt", weights_only=True)["step"] for s in pretrain_mini.STAGES}
    again = pretrain_mini.pretrain(out, work, "smoke", seed=0, progress=False)
    assert {s: again[s] for s in pretrain_mini.STAGES} == {s: report[s] for s in pretrain_mini.STAGES}
    assert {s: torch.load(work / s / "checkpoint.pt", weights_only=True)["step"] for s in steps} == steps


def test_model_card_names_targets_and_whether_they_are_met():
    report = {
        "seed": 0,
        "scenes": {"num_train": 10, "num_held_out": 4, "resolution": 64},
        "train_seconds": 120.0,
        "vae": {"train_seconds": 60.0, "psnr_db": 27.5},
        "clip": {"train_seconds": 30.0},
        "depth": {"train_seconds": 30.0, "rmse": 12.0},
        "unet": {},
    }
    card = pretrain_mini.model_card(report, "python -m innercontrol.pretrain_mini --out checkpoints/mini")
    assert "| vae | psnr_db | 27.500 | >= 26.0 (met) |" in card
    assert "| depth | rmse | 12.000 | <= 10.0 (NOT met) |" in card
    assert "| unet | base_clip_score_ratio | - | >= 0.8 |" in card
    assert "`python -m innercontrol.pretrain_mini --out checkpoints/mini`" in card and "/work/" not in card
