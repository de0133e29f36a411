"""Base-model families (SD1.5, SDXL): their text encoders, how a prompt becomes the UNet's conditioning, and the
ControlNet pipeline that samples with them. The training step, probe pretraining and validation ask the family
instead of branching on it; ControlledUNet takes the PromptEmbeddings it returns.

    family = family_of(folder)                       # from the folder's model_index.json
    prompt = family.encode_prompts(sd, ["a red cube"], device, image_size=(1024, 1024))
    out = ControlledUNet(sd.unet, controlnet)(noisy, t, prompt, control)   # SDXL's added conditioning included

SDXL (Podell et al. 2023): the penultimate hidden states of both text encoders, concatenated (768 + 1280 = 2048
channels), the pooled projection of the second encoder, and six "micro-conditioning" numbers (original size, crop
top-left, target size) embedded beside the timestep. Training uses (H, W, 0, 0, H, W) for an H x W training image,
which is what the SDXL pipelines pass by default at inference, so training and sampling see the same numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

# The model kind of the base model alone (no ControlNet or adapter; evaluation's `--controlnet none`, the floor of
# controllability): the key of its pipeline in ModelFamily.pipelines.
NO_CONTROLNET = "none"


@dataclass
class PromptEmbeddings:
    """The UNet's text conditioning: per-token states (B, 77, D) and the family's added conditioning (SDXL:
    "text_embeds" (B, P) and "time_ids" (B, 6); empty for SD1.5)."""

    hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hidden_states)

    def to(self, *args, **kwargs) -> PromptEmbeddings:
        """Every tensor moved / cast as Tensor.to(*args, **kwargs) would."""
        added = {key: value.to(*args, **kwargs) for key, value in self.added_cond_kwargs.items()}
        return PromptEmbeddings(self.hidden_states.to(*args, **kwargs), added)

    def expand(self, batch: int) -> PromptEmbeddings:
        """One prompt repeated `batch` times (a view, as Tensor.expand)."""
        added = {key: value.expand(batch, *value.shape[1:]) for key, value in self.added_cond_kwargs.items()}
        return PromptEmbeddings(self.hidden_states.expand(batch, *self.hidden_states.shape[1:]), added)

    def rows(self) -> list[PromptEmbeddings]:
        """One PromptEmbeddings per prompt (batch 1 each)."""
        return [self.select(slice(i, i + 1)) for i in range(len(self))]

    def select(self, index) -> PromptEmbeddings:
        added = {key: value[index] for key, value in self.added_cond_kwargs.items()}
        return PromptEmbeddings(self.hidden_states[index], added)

    @staticmethod
    def cat(parts: list[PromptEmbeddings]) -> PromptEmbeddings:
        added = {key: torch.cat([p.added_cond_kwargs[key] for p in parts]) for key in parts[0].added_cond_kwargs}
        return PromptEmbeddings(torch.cat([p.hidden_states for p in parts]), added)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per family
class ModelFamily:
    """What differs between base models of one family: text parts, prompt encoding, pipeline classes."""

    name: str
    # (tokenizer subfolder, text encoder subfolder, transformers class of the encoder), in the order the UNet's
    # encoder_hidden_states concatenates them.
    text_parts: tuple[tuple[str, str, str], ...]
    # The diffusers pipeline classes that generate with the base model alone (NO_CONTROLNET, the floor), with a
    # ControlNet (evaluation; validation grids during training) and with a T2I-Adapter, and the options the ControlNet
    # pipeline is built with in validation beside the model parts.
    pipelines: dict[str, str]
    pipeline_options: dict = field(default_factory=dict)
    # A VAE that decodes in fp16 where the family's own overflows (None: the family's VAE is fine in fp16).
    fp16_vae: str | None = None

    @property
    def controlnet_pipeline(self) -> str:
        return self.pipelines["controlnet"]

    @torch.no_grad()
    def encode_prompts(self, sd, captions: list[str], device, image_size: tuple[int, int]) -> PromptEmbeddings:
        raise NotImplementedError


class SD15Family(ModelFamily):
    @torch.no_grad()
    def encode_prompts(self, sd, captions, device, image_size=None) -> PromptEmbeddings:
        """The last hidden states of the CLIP text encoder (B, 77, 768), as StableDiffusionPipeline computes them."""
        from innercontrol.models import encode_prompts

        return PromptEmbeddings(encode_prompts(sd.tokenizer, sd.text_encoder, captions, device))


class SDXLFamily(ModelFamily):
    @torch.no_grad()
    def encode_prompts(self, sd, captions, device, image_size) -> PromptEmbeddings:
        """Both encoders' penultimate hidden states concatenated, the second's pooled projection, and the size ids
        (H, W, 0, 0, H, W), as StableDiffusionXLPipeline computes them for a prompt at image_size (H, W)."""
        from innercontrol.reward import host_to_device

        outputs = [
            encoder(host_to_device(tokenize(tokenizer, captions), device), output_hidden_states=True)
            for tokenizer, encoder in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2))
        ]
        states = [output.hidden_states[-2] for output in outputs]
        pooled = outputs[1].text_embeds  # CLIPTextModelWithProjection: the projected pooled embedding
        height, width = image_size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(captions), -1)}
        return PromptEmbeddings(torch.cat(states, dim=-1), added)


SD15 = SD15Family(
    "sd15",
    (("tokenizer", "text_encoder", "CLIPTextModel"),),
    pipelines={
        NO_CONTROLNET: "StableDiffusionPipeline",
        "controlnet": "StableDiffusionControlNetPipeline",
        "t2i_adapter": "StableDiffusionAdapterPipeline",
    },
    pipeline_options=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
)
SDXL = SDXLFamily(
    "sdxl",
    (("tokenizer", "text_encoder", "CLIPTextModel"), ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection")),
    pipelines={
        NO_CONTROLNET: "StableDiffusionXLPipeline",
        "controlnet": "StableDiffusionXLControlNetPipeline",
        "t2i_adapter": "StableDiffusionXLAdapterPipeline",
    },
    pipeline_options=dict(force_zeros_for_empty_prompt=True, add_watermarker=False),
    fp16_vae="madebyollin/sdxl-vae-fp16-fix",
)


def family_of(folder: str) -> ModelFamily:
    """The family of a pipeline folder: SDXL when its model_index.json names an XL pipeline class, else SD1.5."""
    with open(os.path.join(folder, "model_index.json")) as index_file:
        index = json.load(index_file)
    return SDXL if "XL" in index.get("_class_name", "") else SD15
