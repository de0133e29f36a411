"""The miniature's VAE: a diffusers AutoencoderKL of SD's kind (4 latent channels) with 3 levels, f = 4.

SD's f = 8 on 128 px scenes gave 20.3 dB after 750 steps (trial); f = 4 on 64 px scenes gives the UNet the same
16 x 16 latents and reached 24.4 dB in the same steps.

    vae = train(train_bank, PRESETS["cpu"], work, seed=0)     # resumable stage work/vae
    evaluate(vae, held_out_bank, PRESETS["cpu"])              # {"psnr_db": ..., ...}
    save(vae, folder)                                         # AutoencoderKL.from_pretrained(folder)

Trained as SD's first stage without the adversarial term: L1 reconstruction of a posterior sample, a small KL
weight, and an L1 on image gradients that keeps edges sharp. Training may use random crops (`crop`; the network is
convolutional); the cpu preset trains on whole 64 px scenes; evaluation decodes whole held-out scenes.
After training, scaling_factor is set to 1 / std of the training latents, as SD's 0.18215 was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from innercontrol.mini.scenes import SceneBank
from innercontrol.mini.stage import Stage

PRESETS: dict[str, dict] = {
    # Sized by measurement on a 2-core CPU for about 20 minutes of training (see the model card).
    "cpu": dict(
        block_out_channels=(32, 64, 128),  # f = 4
        layers_per_block=1,
        norm_num_groups=8,
        crop=64,  # the whole 64 px scene
        batch_size=16,
        # Trials, held-out PSNR at 250/500/750 steps. 128 px, f = 8: lr 2e-3 18.6/19.0/19.5, lr 5e-4 18.4/19.3/20.3 dB.
        # 64 px, f = 4 (0.38 s/step): lr 5e-4 21.5/22.7/24.4 dB.
        lr=5e-4,
        warmup=100,
        checkpoint_every=250,
        max_steps=3000,
        bf16=True,  # CPU autocast: twice the steps per second where the CPU has bf16 units (AMX, AVX512-BF16)
        kl_weight=1e-6,
        initial_log_variance=-8.0,
        edge_weight=0.5,
        scaling_scenes=256,
        eval_batch_size=32,
    ),
    # Tests: a few steps on 32 px scenes.
    "smoke": dict(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        crop=16,
        batch_size=4,
        lr=1e-3,
        warmup=2,
        checkpoint_every=3,
        max_steps=6,
        bf16=False,
        kl_weight=1e-6,
        initial_log_variance=-8.0,
        edge_weight=0.5,
        scaling_scenes=8,
        eval_batch_size=8,
    ),
}


def build(preset: dict, resolution: int = 128, seed: int = 0):
    """A freshly initialised AutoencoderKL of the preset's widths (same seed, same weights)."""
    from diffusers import AutoencoderKL

    levels = len(preset["block_out_channels"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(preset["block_out_channels"]),
        layers_per_block=preset["layers_per_block"],
        latent_channels=4,
        norm_num_groups=preset["norm_num_groups"],
        sample_size=resolution,
    )
    # A fresh encoder predicts log-variance ~0: posterior samples would be unit noise swamping the image signal and
    # the decoder would first learn to ignore them. Start near-deterministic, as a trained SD posterior is.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = preset["initial_log_variance"]
    return vae


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random `size` x `size` crop per image (the whole image when size >= its side)."""
    side = images.shape[-1]
    if size >= side:
        return images
    corners = torch.randint(0, side - size + 1, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([image[:, y : y + size, x : x + size] for image, (y, x) in zip(images, corners)])


def image_gradient_l1(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical finite differences of two images (an edge-sharpness term)."""

    def gradients(x):
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (rx, ry), (tx, ty) = gradients(reconstruction), gradients(target)
    return 0.5 * ((rx - tx).abs().mean() + (ry - ty).abs().mean())


def vae_loss(vae, images: torch.Tensor, preset: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Reconstruction L1 + edge L1 of a posterior sample, plus the KL to N(0, I) (SD's first stage, no GAN)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=preset["bf16"]):
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample.float()
    l1 = (reconstruction - images).abs().mean()
    edge = image_gradient_l1(reconstruction, images)
    kl = posterior.kl().mean() / images[0].numel()  # per pixel, so kl_weight does not depend on the crop size
    loss = l1 + preset["edge_weight"] * edge + preset["kl_weight"] * kl
    return {"loss": loss, "l1": l1.detach(), "edge": edge.detach(), "kl": kl.detach()}


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, batch_size: int) -> float:
    """Standard deviation of the posterior means of `images` (all channels and positions together)."""
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(batch_size)])
    return means.std().item()


def set_scaling_factor(vae, bank: SceneBank, preset: dict) -> float:
    """scaling_factor = 1 / std of the latents of the first training scenes, so scaled latents have unit variance."""
    images, _, _ = bank.batch(range(min(len(bank), preset["scaling_scenes"])))
    scaling = round(1.0 / latent_std(vae, images, preset["eval_batch_size"]), 4)
    vae.register_to_config(scaling_factor=scaling)
    return scaling


def train(train_bank: SceneBank, preset: dict, work: str | Path, seed: int = 0, progress: bool = True):
    """Train (or resume, or reload when done) the stage work/vae; the VAE in eval mode, its scaling_factor set."""
    vae = build(preset, resolution=train_bank.images.shape[-1], seed=seed)
    stage = Stage.from_preset("vae", work, vae, preset, seed, progress)

    def step(step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        indices = torch.randint(len(train_bank), (preset["batch_size"],), generator=generator)
        images, _, _ = train_bank.batch(indices)
        images = random_crops(images, preset["crop"], generator)
        return vae_loss(vae, images, preset, generator)

    stage.run(step)
    set_scaling_factor(vae, train_bank, preset)
    return vae.eval()


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of images in [-1, 1] (measured on the [0, 1] scale, data range 1)."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """Decode of the posterior mean (how the pipeline round-trips an image), clamped to [-1, 1]."""
    return vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)


@torch.no_grad()
def evaluate(vae, held_out_bank: SceneBank, preset: dict) -> dict:
    """Held-out reconstruction PSNR (mean over scenes, and its worst 5 %) and the std of the scaled latents."""
    vae.eval()
    scores, latents = [], []
    for start in range(0, len(held_out_bank), preset["eval_batch_size"]):
        images, _, _ = held_out_bank.batch(range(start, min(start + preset["eval_batch_size"], len(held_out_bank))))
        mean = vae.encode(images).latent_dist.mean
        scores.append(psnr(vae.decode(mean).sample, images))
        latents.append(mean * vae.config.scaling_factor)
    scores = torch.cat(scores)
    return {
        "psnr_db": round(scores.mean().item(), 3),
        "psnr_db_p5": round(scores.quantile(0.05).item(), 3),
        "scaled_latent_std": round(torch.cat(latents).std().item(), 4),
        "scaling_factor": vae.config.scaling_factor,
        "held_out_scenes": len(held_out_bank),
    }


def save(vae, folder: str | Path) -> Path:
    """Write the VAE as the pipeline's vae/ folder (config.json + safetensors)."""
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder
