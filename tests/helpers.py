"""Small building blocks shared by the tests (tiny models come from innercontrol.tiny)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py as a module (the bench scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def record_instances(monkeypatch, module, name: str) -> list:
    """Replace the class module.<name> by a subclass that appends each instance it makes to the returned list."""
    made = []

    class Recorded(getattr(module, name)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(module, name, Recorded)
    return made


class IdentityNormCondition:
    """Stand-in condition with identity normalisations, for checking loss arithmetic by hand."""

    name = "identity"

    def __init__(self, model: nn.Module | None = None):
        self.model = model

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.model is None else self.model(images)

    def normalize_probe_output(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction

    def normalize_label(self, control: torch.Tensor) -> torch.Tensor:
        return control

    def reward_prediction(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    def reward_label(self, control: torch.Tensor) -> torch.Tensor:
        return control


def frozen_conv_condition(seed: int = 0) -> IdentityNormCondition:
    """A frozen differentiable 'condition model': RGB in [0,1] -> 3-channel map in [0,1]."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sigmoid()).requires_grad_(False).eval()
    return IdentityNormCondition(net)


def load_tiny_components(tiny_dir):
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    controlnet = ControlNetModel.from_pretrained(tiny_dir, subfolder="controlnet")
    vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    return unet, controlnet, vae, scheduler


def killed_after_first_checkpoint_then_resumed(train, work, monkeypatch):
    """Run train(work) until the stage's first checkpoint is saved and kill it there (KeyboardInterrupt right after
    Stage.save), then run train(work) again. Returns (the step of the checkpoint left behind, the resumed model)."""
    import pytest

    from innercontrol.mini import stage

    original_save = stage.Stage.save

    def save_then_die(self):
        original_save(self)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(stage.Stage, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(work)
    checkpoints = list(work.glob("*/checkpoint.pt"))
    assert len(checkpoints) == 1
    step = torch.load(checkpoints[0], weights_only=True)["step"]
    return step, train(work)
