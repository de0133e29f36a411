"""The miniature's UNet: SD1.5's block layout (3 cross-attention down blocks, 12 decoder ResNets, 9 decoder attention
modules) at small widths, trained as SD was: epsilon prediction on the VAE's scaled latents, conditioned on the
frozen CLIP text encoder's last hidden state (77 positions), captions dropped to "" 10% of the time so that
classifier-free guidance works.

Latents and text embeddings of the train bank are computed once (frozen VAE and text encoder) and cached in the work
folder, so a step costs one UNet forward and backward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from innercontrol.mini.stage import Stage
from innercontrol.tiny import SCHEDULER_CONFIG

PRESETS = {
    "cpu": dict(
        block_out_channels=(32, 64, 128, 128),
        norm_num_groups=16,
        attention_head_dim=8,
        batch_size=32,
        lr=5e-4,  # a short schedule (3000 steps) for 8.6 M parameters
        # Measured on the 2-core CPU: 0.63-0.8 s a step at batch 32 (8.6 M parameters): 3000 steps took ~40 minutes.
        max_steps=3000,
        warmup=200,
        caption_dropout=0.1,
        sample_steps=20,
        guidance_scale=4.0,
        eval_samples=64,
    ),
    "smoke": dict(
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=4,
        attention_head_dim=4,
        batch_size=4,
        lr=1e-3,
        max_steps=6,
        warmup=2,
        caption_dropout=0.1,
        sample_steps=3,
        guidance_scale=4.0,
        eval_samples=4,
    ),
}


def unet_config(preset: dict, cross_attention_dim: int, latent_size: int) -> dict:
    """SD1.5's UNet layout (innercontrol.tiny.SD15_UNET_CONFIG) at the preset's widths."""
    return dict(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(preset["block_out_channels"]),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=preset["attention_head_dim"],
        norm_num_groups=preset["norm_num_groups"],
    )


def build(preset: dict, cross_attention_dim: int, latent_size: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(preset, cross_attention_dim, latent_size))


def noise_scheduler():
    """SD1.5's training noise schedule (scaled linear betas, 1000 steps, epsilon)."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    return DDPMScheduler(**config)


@torch.no_grad()
def encode_bank(bank, vae, tokenizer, text_encoder, batch_size: int = 64, progress: bool = True):
    """(latents * scaling_factor (N,4,h,w), text embeddings (N,77,D), empty-prompt embedding (1,77,D))."""
    from tqdm.auto import tqdm

    from innercontrol.models import encode_prompts

    latents, texts = [], []
    for start in tqdm(range(0, len(bank), batch_size), desc="encode scenes", disable=not progress):
        images, _, captions = bank.batch(range(start, min(start + batch_size, len(bank))))
        latents.append(vae.encode(images).latent_dist.mean * vae.config.scaling_factor)
        texts.append(encode_prompts(tokenizer, text_encoder, captions, "cpu").to(torch.float16))
    empty = encode_prompts(tokenizer, text_encoder, [""], "cpu")
    return torch.cat(latents), torch.cat(texts), empty


def cached_encodings(bank, vae, tokenizer, text_encoder, work: Path, progress: bool = True):
    """encode_bank, cached in work/unet/encodings.pt (computed once per bank and frozen models)."""
    path = Path(work) / "unet" / "encodings.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached["latents"].shape[0] == len(bank):
            return cached["latents"], cached["texts"], cached["empty"]
    latents, texts, empty = encode_bank(bank, vae, tokenizer, text_encoder, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("encodings.pt.tmp")
    torch.save({"latents": latents, "texts": texts, "empty": empty}, tmp)
    tmp.replace(path)
    return latents, texts, empty


def diffusion_step(unet, scheduler, latents, texts, empty, preset: dict, generator: torch.Generator) -> dict:
    """One SD training step's loss on a batch drawn with `generator` (indices, caption dropout, t, noise)."""
    batch = preset["batch_size"]
    index = torch.randint(0, latents.shape[0], (batch,), generator=generator)
    x0 = latents[index]
    text = texts[index].float()
    dropped = torch.rand(batch, generator=generator) < preset["caption_dropout"]
    text = torch.where(dropped[:, None, None], empty.expand_as(text), text)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    noisy = scheduler.add_noise(x0, noise, t)
    prediction = unet(noisy, t, encoder_hidden_states=text, return_dict=False)[0]
    loss = F.mse_loss(prediction, noise)
    return {"loss": loss}


def train(train_bank, preset: dict, work: Path, seed: int, vae, tokenizer, text_encoder, progress: bool = True):
    latents, texts, empty = cached_encodings(train_bank, vae, tokenizer, text_encoder, work, progress)
    unet = build(preset, texts.shape[-1], latents.shape[-1], seed)
    scheduler = noise_scheduler()
    stage = Stage.from_preset("unet", work, unet, preset, seed, progress)
    stage.run(lambda step, generator: diffusion_step(unet, scheduler, latents, texts, empty, preset, generator))
    return unet, stage


def pipeline(vae, text_encoder, tokenizer, unet):
    """StableDiffusionPipeline of the miniature's parts (UniPC sampler, no safety checker)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, captions: list[str], preset: dict, seed: int, resolution: int) -> torch.Tensor:
    """Images (B,3,R,R) in [0,1] for the captions, one seeded generator per caption."""
    images = pipe(
        captions,
        num_inference_steps=preset["sample_steps"],
        guidance_scale=preset["guidance_scale"],
        height=resolution,
        width=resolution,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(len(captions))],
        output_type="pt",
    ).images
    return images.float().clamp(0, 1)


@torch.no_grad()
def evaluate(pipe, held_out_bank, preset: dict, clip_model, clip_processor, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """CLIP score (mini CLIP) of samples for held-out captions vs the real held-out scenes with the same captions."""
    from innercontrol.metrics import clip_score

    count = min(preset["eval_samples"], len(held_out_bank))
    real, _, captions = held_out_bank.batch(range(count))
    generated = torch.cat(
        [sample(pipe, captions[i : i + 16], preset, seed + i, real.shape[-1]) for i in range(0, count, 16)]
    )
    real01 = (real + 1) / 2
    generated_score = clip_score(generated, captions, clip_model, clip_processor).mean().item()
    real_score = clip_score(real01, captions, clip_model, clip_processor).mean().item()
    report = {
        "base_clip_score_generated": generated_score,
        "base_clip_score_real": real_score,
        "base_clip_score_ratio": generated_score / max(real_score, 1e-8),
        "base_eval_samples": count,
    }
    return report, generated


def save(unet, folder: Path) -> None:
    unet.save_pretrained(folder, safe_serialization=True)
