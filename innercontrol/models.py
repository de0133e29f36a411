"""Loading the frozen Stable Diffusion parts and the ControlNet from hub ids or local folders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from innercontrol.hub import resolve_model


@dataclass
class StableDiffusionParts:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object  # the training noise scheduler (DDPM with the model's betas)
    folder: str


def load_stable_diffusion(model_cfg) -> StableDiffusionParts:
    """Tokenizer, text encoder, VAE, UNet and a DDPM training scheduler, all frozen and in eval mode."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = resolve_model(model_cfg.pretrained_model, "Stable Diffusion model", "model.pretrained_model")
    common = dict(revision=model_cfg.revision)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **common)
    if len(tokenizer) <= 2:
        raise RuntimeError(
            f"the tokenizer in '{folder}/tokenizer' has only {len(tokenizer)} tokens (an offline hub id can load "
            f"empty); pass a complete local folder as model.pretrained_model"
        )
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **common)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **common)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant=model_cfg.variant, **common)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **common)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).eval()
    return StableDiffusionParts(tokenizer, text_encoder, vae, unet, scheduler, folder)


def load_controlnet(model_cfg, unet) -> torch.nn.Module:
    """The ControlNet to train: model.controlnet (hub id or folder), or initialised from the UNet when null."""
    from diffusers import ControlNetModel

    if model_cfg.controlnet is None:
        return ControlNetModel.from_unet(unet)
    folder = resolve_model(model_cfg.controlnet, "ControlNet", "model.controlnet")
    return ControlNetModel.from_pretrained(folder)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """CLIP text embeddings (B, 77, D) of the captions, as the SD pipeline computes them."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(device))[0]
