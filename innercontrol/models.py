"""Loading the frozen Stable Diffusion parts and the ControlNet from hub ids or local folders."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from innercontrol.families import SD15, ModelFamily, PromptEmbeddings, family_of, tokenize
from innercontrol.hub import ModelFolderError, check_model_folder, resolve_model
from innercontrol.reward import host_to_device


@dataclass
class StableDiffusionParts:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object  # the training noise scheduler (DDPM with the model's betas)
    folder: str
    family: ModelFamily = SD15
    tokenizer_2: object = None  # SDXL's second tokenizer and text encoder (with projection); None for SD1.5
    text_encoder_2: Optional[torch.nn.Module] = None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [encoder for encoder in (self.text_encoder, self.text_encoder_2) if encoder is not None]

    def components(self) -> dict:
        """The frozen parts under the names diffusers pipelines take (vae, unet, tokenizer, text_encoder, and for
        SDXL tokenizer_2, text_encoder_2)."""
        parts = {"vae": self.vae, "unet": self.unet}
        text = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        for (tokenizer_name, encoder_name, _), (tokenizer, encoder) in zip(self.family.text_parts, text):
            parts[tokenizer_name], parts[encoder_name] = tokenizer, encoder
        return parts

    def encode_prompts(self, captions: list[str], device, image_size: tuple[int, int]) -> PromptEmbeddings:
        """The UNet's conditioning for the captions, as this model's family computes it (families.py)."""
        return self.family.encode_prompts(self, captions, device, image_size)


def model_files(tokenizers: tuple[str, ...], text_encoders: tuple[str, ...]) -> dict:
    """What from_pretrained reads from a pipeline folder: part -> glob patterns, any one of which provides it."""
    parts = (*text_encoders, "vae", "unet")
    return {
        "model_index.json": ("model_index.json",),
        **{
            f"{name}/tokenizer.json (or vocab.json and merges.txt)": (f"{name}/tokenizer.json", f"{name}/vocab.json")
            for name in tokenizers
        },
        **{f"{part}/config.json": (f"{part}/config.json",) for part in parts},
        **{f"{part}/ weights": (f"{part}/*.safetensors", f"{part}/*.bin") for part in parts},
        "scheduler/scheduler_config.json": ("scheduler/scheduler_config.json",),
    }


STABLE_DIFFUSION_FILES = model_files(("tokenizer",), ("text_encoder",))
STABLE_DIFFUSION_HOLDS = (
    "a Stable Diffusion model in the diffusers layout (model_index.json, tokenizer/, text_encoder/, vae/, unet/, "
    "scheduler/; SDXL also tokenizer_2/ and text_encoder_2/), as `hf download stable-diffusion-v1-5/stable-diffusion-"
    "v1-5 --local-dir DIR` or `python -m innercontrol.tiny --out DIR` writes it"
)
CONTROLNET_FILES = {
    "config.json": ("config.json",),
    "weights (diffusion_pytorch_model.safetensors)": ("*.safetensors", "*.bin"),
}
CONTROLNET_HOLDS = (
    "a diffusers ControlNet (config.json and diffusion_pytorch_model.safetensors), such as the controlnet/ folder a "
    "training run writes"
)


def stable_diffusion_folder(name_or_path: str, config_key: str = "model.pretrained_model") -> str:
    """The local folder of a Stable Diffusion hub id or path, checked to hold every part the loaders read."""
    folder = resolve_model(name_or_path, "Stable Diffusion model", config_key)
    check_model_folder(folder, STABLE_DIFFUSION_FILES, STABLE_DIFFUSION_HOLDS, config_key, name_or_path)
    text_parts = family_of(folder).text_parts
    if len(text_parts) > 1:  # SDXL: the second tokenizer and text encoder too
        files = model_files(tuple(p[0] for p in text_parts), tuple(p[1] for p in text_parts))
        check_model_folder(folder, files, STABLE_DIFFUSION_HOLDS, config_key, name_or_path)
    return folder


def check_vae_precision(model_cfg, mixed_precision: str) -> None:
    """Refuse fp16 with a VAE of a family whose VAE overflows in fp16 (SDXL's) unless the VAE says it is safe
    (force_upcast false, as madebyollin/sdxl-vae-fp16-fix); reads config files only, so it runs before a job
    writes or removes anything."""
    import json

    if mixed_precision != "fp16":
        return
    folder = stable_diffusion_folder(model_cfg.pretrained_model)
    family = family_of(folder)
    if family.fp16_vae is None:
        return
    vae_name = getattr(model_cfg, "vae", None)
    vae_folder = resolve_model(vae_name, "VAE", "model.vae") if vae_name else os.path.join(folder, "vae")
    with open(os.path.join(vae_folder, "config.json")) as config_file:
        if json.load(config_file).get("force_upcast", True):
            from innercontrol.config import ConfigError

            raise ConfigError(
                f"{family.name}'s VAE ('{vae_folder}') overflows in fp16 (inf/NaN latents and rewards): set "
                f"model.vae={family.fp16_vae} or optim.mixed_precision=bf16"
            )


def controlnet_folder(name_or_path: str, config_key: str = "model.controlnet") -> str:
    """The local folder of a ControlNet: a ControlNet folder, a training output holding controlnet/, or a hub id."""
    folder = resolve_model(name_or_path, "ControlNet", config_key)
    inner = os.path.join(folder, "controlnet")
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(inner, "config.json")):
        folder = inner
    check_model_folder(folder, CONTROLNET_FILES, CONTROLNET_HOLDS, config_key, name_or_path)
    return folder


def _from_pretrained(cls, folder: str, config_key: str, subfolder: Optional[str] = None, **kwargs):
    """cls.from_pretrained, with the folder and config key named when its files cannot be read."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(folder, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # damaged files (the original error is chained)
        where = os.path.join(folder, subfolder) if subfolder else folder
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ModelFolderError(
            f"cannot load {cls.__name__} from '{where}' ({config_key}): {type(err).__name__}: {first_line}; the files "
            f"are damaged or incomplete: download or copy them again"
        ) from err


def load_stable_diffusion(model_cfg) -> StableDiffusionParts:
    """Tokenizers, text encoders (the family's: one for SD1.5, two for SDXL), VAE (model.vae replaces the base's),
    UNet and a DDPM training scheduler, all frozen and in eval mode."""
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    key = "model.pretrained_model"
    folder = stable_diffusion_folder(model_cfg.pretrained_model, key)
    family = family_of(folder)
    common = dict(revision=model_cfg.revision)
    text = []
    for tokenizer_folder, encoder_folder, encoder_class in family.text_parts:
        tokenizer = _from_pretrained(CLIPTokenizer, folder, key, tokenizer_folder, **common)
        if len(tokenizer) <= 2:  # transformers builds a tokenizer of only the special tokens from unreadable files
            raise ModelFolderError(
                f"the tokenizer in '{folder}/{tokenizer_folder}' ({key}) has only {len(tokenizer)} tokens: its "
                f"tokenizer.json or vocab.json and merges.txt are damaged; it should hold {STABLE_DIFFUSION_HOLDS}"
            )
        encoder_cls = getattr(transformers, encoder_class)
        text.append((tokenizer, _from_pretrained(encoder_cls, folder, key, encoder_folder, **common)))
    vae_name = getattr(model_cfg, "vae", None)
    if vae_name:  # e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's VAE decodes to inf/NaN in fp16
        vae = _from_pretrained(AutoencoderKL, resolve_model(vae_name, "VAE", "model.vae"), "model.vae")
    else:
        vae = _from_pretrained(AutoencoderKL, folder, key, "vae", **common)
    unet = _from_pretrained(UNet2DConditionModel, folder, key, "unet", variant=model_cfg.variant, **common)
    scheduler = _from_pretrained(DDPMScheduler, folder, key, "scheduler", **common)
    for module in (*(encoder for _, encoder in text), vae, unet):
        module.requires_grad_(False).eval()
    (tokenizer, text_encoder), *second = text
    tokenizer_2, text_encoder_2 = second[0] if second else (None, None)
    if unet.config.addition_embed_type == "text_time" and text_encoder_2 is not None:
        # SDXL's add_embedding takes 6 size ids x addition_time_embed_dim + the pooled projection of encoder 2.
        expected = 6 * unet.config.addition_time_embed_dim + text_encoder_2.config.projection_dim
        if unet.add_embedding.linear_1.in_features != expected:
            raise ModelFolderError(
                f"'{folder}' ({key}): the UNet's added conditioning takes {unet.add_embedding.linear_1.in_features} "
                f"numbers but 6 size ids x {unet.config.addition_time_embed_dim} + text_encoder_2's projection "
                f"{text_encoder_2.config.projection_dim} give {expected}: the UNet and text_encoder_2 come from "
                "different models"
            )
    return StableDiffusionParts(
        tokenizer, text_encoder, vae, unet, scheduler, folder, family, tokenizer_2, text_encoder_2
    )


# ControlNetModel's default conditioning embedding: its len - 1 stride-2 convolutions bring the control image to the
# latent size of SD's f = 8 VAE.
CONDITIONING_CHANNELS = (16, 32, 96, 256)


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of a conditioning embedding that downsamples by `vae_scale_factor` (SD's default for 8)."""
    downsamplings = int(math.log2(vae_scale_factor))
    if 2**downsamplings != vae_scale_factor or not 1 <= downsamplings < len(CONDITIONING_CHANNELS):
        raise ValueError(f"a ControlNet can be made for a VAE scale factor of 2, 4 or 8, not {vae_scale_factor}")
    return CONDITIONING_CHANNELS[: downsamplings + 1]


def vae_scale_factor(vae) -> int:
    """Image pixels per latent pixel (8 for SD's VAE, 4 for the miniature's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_controlnet(model_cfg, unet, vae=None) -> torch.nn.Module:
    """The ControlNet to train: model.controlnet (hub id or folder), or initialised from the UNet when null.

    From the UNet, the conditioning embedding downsamples the control image by the VAE's scale factor (SD's f = 8
    layout unless `vae` says otherwise).
    """
    from diffusers import ControlNetModel

    if model_cfg.controlnet is None:
        factor = vae_scale_factor(vae) if vae is not None else 8
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(factor))
    return _from_pretrained(ControlNetModel, controlnet_folder(model_cfg.controlnet), "model.controlnet")


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """CLIP text embeddings (B, 77, D) of the captions, as the SD pipeline computes them."""
    return text_encoder(host_to_device(tokenize(tokenizer, captions), device))[0]


def encode_latents(vae: torch.nn.Module, images: torch.Tensor, cache=None, row_ids=None) -> torch.Tensor:
    """Scaled latents drawn from the VAE's latent distribution of the images (the training input); with a LatentCache
    (and the images' dataset row ids) the distribution it keeps for rows it has seen. Call under torch.no_grad()."""
    if cache is not None:
        return cache(images, row_ids)
    return vae.encode(images).latent_dist.sample() * vae.config.scaling_factor


class LatentCache:
    """A VAE image encoder (images, row ids -> scaled latents) that keeps the latent distribution (mean and
    log-variance) of the last `max_entries` distinct rows. The VAE is frozen and a row decodes to the same pixels every
    epoch (no random augmentation), so encoding it again would give the same distribution: each call only draws a
    fresh sample from the kept one, with the random numbers an uncached encode would draw.

        encode = LatentCache(sd.vae, max_entries=1024)
        latents = encode(batch["pixel_values"], batch["row_id"])   # the encoder runs only for a batch with a new row

    A batch with any new row is encoded whole, as without the cache: the encoder's rounding depends on the batch size
    (not on which rows share the batch), so the kept values are those an uncached encode of a batch of that size
    gives, and a run whose batches keep one size trains bit for bit as without the cache (tests/test_train.py).
    """

    def __init__(self, vae: torch.nn.Module, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.vae, self.max_entries = vae, max_entries
        self.entries: OrderedDict[object, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0  # rows read from the cache / rows new to it
        self.memory_format = torch.contiguous_format

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, row_ids: list) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if len(row_ids) != len(images):
            raise ValueError(f"{len(row_ids)} row ids for {len(images)} images")
        missing = [row for row in dict.fromkeys(row_ids) if row not in self.entries]
        self.misses += len(missing)
        self.hits += len(row_ids) - len(missing)
        if missing:
            parameters = self.vae.encode(images).latent_dist.parameters
            if parameters.is_contiguous(memory_format=torch.channels_last) and not parameters.is_contiguous():
                self.memory_format = torch.channels_last  # oneDNN's convolutions on the CPU write channels-last
            for row, row_parameters in zip(row_ids, parameters):
                self.entries[row] = row_parameters.clone()  # its own storage: an evicted row frees its memory
        # In the encoder's memory layout: the layers after run the kernels they run after an uncached encode, and
        # training stays bit-identical (another layout gives other rounding, which Adam amplifies).
        parameters = torch.stack([self.entries[row] for row in row_ids]).contiguous(memory_format=self.memory_format)
        for row in row_ids:
            self.entries.move_to_end(row)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return DiagonalGaussianDistribution(parameters).sample() * self.vae.config.scaling_factor


class TextEmbeddingCache:
    """A prompt encoder (captions -> PromptEmbeddings) with the embeddings of the last `max_entries` distinct captions
    kept (the text encoders are frozen, so a caption's embedding never changes); the empty caption of caption dropout
    is never evicted.

        encode = TextEmbeddingCache(lambda captions: sd.encode_prompts(captions, device, size), max_entries=4096)
        prompt = encode(batch["caption"])   # only the captions not cached are run through the encoders
    """

    def __init__(self, encode: Callable[[list[str]], PromptEmbeddings], max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.encode, self.max_entries = encode, max_entries
        self.entries: OrderedDict[str, PromptEmbeddings] = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> PromptEmbeddings:
        missing = [c for c in dict.fromkeys(captions) if c not in self.entries]
        self.misses += len(missing)  # rows run through the text encoders
        self.hits += len(captions) - len(missing)
        if missing:
            for caption, embedding in zip(missing, self.encode(missing).rows()):
                self.entries[caption] = embedding
        prompt = PromptEmbeddings.cat([self.entries[c] for c in captions])
        for caption in captions:
            self.entries.move_to_end(caption)
        while len(self.entries) > self.max_entries:
            oldest = next(c for c in self.entries if c != "" or len(self.entries) == 1)
            del self.entries[oldest]
        return prompt
