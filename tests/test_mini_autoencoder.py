"""The miniature's VAE stage (innercontrol/mini/autoencoder.py): training, resume, scaling factor, PSNR, save/load."""

import math
from types import SimpleNamespace

import pytest
import torch

from innercontrol.mini import autoencoder
from innercontrol.mini.scenes import SceneBank

from .helpers import killed_after_first_checkpoint_then_resumed

SMOKE = autoencoder.PRESETS["smoke"]


@pytest.fixture(scope="module")
def bank():
    return SceneBank.render(num=16, resolution=32, seed=3, progress=False)


@pytest.fixture(scope="module")
def trained(bank, tmp_path_factory):
    return autoencoder.train(bank, SMOKE, tmp_path_factory.mktemp("vae_work"), seed=0, progress=False)


def fixed_batch_l1(vae, bank):
    images, _, _ = bank.batch(range(8))
    return float((autoencoder.reconstruct(vae, images) - images).abs().mean())


def test_smoke_training_lowers_the_reconstruction_error(trained, bank):
    assert not trained.training
    assert trained.config.latent_channels == 4 and len(trained.config.block_out_channels) == 4  # f = 8
    before = fixed_batch_l1(autoencoder.build(SMOKE, resolution=32, seed=0), bank)
    after = fixed_batch_l1(trained, bank)
    assert math.isfinite(after) and after < before - 0.02, (before, after)


def test_scaling_factor_gives_unit_variance_training_latents(trained, bank):
    images, _, _ = bank.batch(range(SMOKE["scaling_scenes"]))
    with torch.no_grad():
        latents = trained.encode(images).latent_dist.mean
    assert float(latents.std()) * trained.config.scaling_factor == pytest.approx(1.0, abs=1e-3)
    assert trained.config.scaling_factor != 0.18215  # set from the data, not left at diffusers' default


def test_fresh_posterior_starts_near_deterministic():
    vae = autoencoder.build(SMOKE, resolution=32, seed=0)
    with torch.no_grad():
        posterior = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist
    # Log-variance bias -8: posterior std ~e^-4 = 0.018 (the weights add a little); diffusers' default gives ~1.
    assert 0.005 < float(posterior.std.max()) < 0.05


def test_resumed_run_equals_an_uninterrupted_one(bank, trained, tmp_path, monkeypatch):
    step, resumed = killed_after_first_checkpoint_then_resumed(
        lambda work: autoencoder.train(bank, SMOKE, work, seed=0, progress=False), tmp_path, monkeypatch
    )
    assert step == SMOKE["checkpoint_every"]
    straight = trained.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, straight[name], rtol=0, atol=1e-6, msg=name)
    assert resumed.config.scaling_factor == trained.config.scaling_factor


def test_psnr_of_a_known_perturbation():
    target = torch.rand(2, 3, 8, 8) * 1.6 - 0.8
    # +0.1 on the [-1, 1] scale is 0.05 on [0, 1]: MSE 0.0025, PSNR 10 log10(1 / 0.0025) = 26.0206 dB.
    assert autoencoder.psnr(target + 0.1, target).tolist() == pytest.approx([26.0206] * 2, abs=1e-3)
    # Reconstructions are clamped to the image range before scoring.
    assert autoencoder.psnr(torch.full((1, 3, 4, 4), 3.0), torch.ones(1, 3, 4, 4)).item() > 100


class ShiftingVAE:
    """Stand-in VAE: the latent is the image itself, the decode adds a known per-scene offset."""

    def __init__(self, offsets):
        self.config = SimpleNamespace(scaling_factor=2.0)
        self.offsets, self.seen = offsets, 0

    def eval(self):
        return self

    def encode(self, images):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=images))

    def decode(self, latents):
        offset = self.offsets[self.seen : self.seen + len(latents)].view(-1, 1, 1, 1)
        self.seen += len(latents)
        return SimpleNamespace(sample=latents + offset)


def test_evaluate_reports_held_out_psnr_and_latent_std(bank):
    offsets = torch.linspace(0.02, 0.2, len(bank))  # [-1, 1] scale; clamping changes a few pixels of bright scenes
    result = autoencoder.evaluate(ShiftingVAE(offsets), bank, {**SMOKE, "eval_batch_size": 5})
    images, _, _ = bank.batch(range(len(bank)))
    reconstruction = (images + offsets.view(-1, 1, 1, 1)).clamp(-1, 1)
    mse = (((reconstruction - images) / 2) ** 2).flatten(1).mean(1)
    expected = 10 * torch.log10(1 / mse)
    assert result["psnr_db"] == pytest.approx(expected.mean().item(), abs=1e-3)
    assert result["psnr_db_p5"] == pytest.approx(expected.quantile(0.05).item(), abs=1e-3)
    assert result["scaled_latent_std"] == pytest.approx(2.0 * images.std().item(), abs=1e-4)
    assert result["held_out_scenes"] == len(bank)


def test_save_loads_with_diffusers(trained, bank, tmp_path):
    from diffusers import AutoencoderKL

    autoencoder.save(trained, tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert loaded.config.scaling_factor == trained.config.scaling_factor
    images, _, _ = bank.batch(range(4))
    torch.testing.assert_close(autoencoder.reconstruct(loaded, images), autoencoder.reconstruct(trained, images))
