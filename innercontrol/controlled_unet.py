"""ControlNet + frozen UNet in one forward pass, with the UNet's decoder features tapped for the probe.

Tap modes (DESIGN section 2):
  attn  output of self-attention `attn1` (before its residual add) of `transformer_blocks[0]` in every
        decoder attention module: SD1.5 gives 9 maps, 1280x3 @16, 640x3 @32, 320x3 @64 (512 px).
  conv  residual-branch output after `conv2` of every decoder ResNet block (before the shortcut add):
        SD1.5 gives 12 maps, 1280x6, 640x3, 320x3.
SDXL's decoder (up blocks CrossAttn 1280, CrossAttn 640, plain 320) gives 6 attention maps, 1280x3 @32 and 640x3 @64,
and 9 ResNet maps, 1280x3, 640x3, 320x3 (1024 px); tapped_channels reads them from any UNet.
Hooks exist only inside `tap_decoder_features`, so nothing is captured by later calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from innercontrol.families import PromptEmbeddings

TAP_MODES = ("attn", "conv")


def tapped_modules(unet: nn.Module, tap: str) -> list[nn.Module]:
    """The decoder modules whose outputs are tapped, in tap order (the probe's layer order)."""
    if tap not in TAP_MODES:
        raise ValueError(f"unknown tap mode '{tap}': choose one of {', '.join(TAP_MODES)}")
    modules = []
    for block in unet.up_blocks:
        if tap == "attn":
            modules += [attention.transformer_blocks[0].attn1 for attention in getattr(block, "attentions", None) or []]
        else:
            modules += [resnet.conv2 for resnet in block.resnets]
    if not modules:
        raise ValueError(f"the UNet has no decoder modules for tap mode '{tap}' (no cross-attention up blocks?)")
    return modules


def tapped_channels(unet: nn.Module, tap: str) -> list[int]:
    """Channel count of each tapped map, in tap order (the probe's `feature_dims`)."""
    if tap == "attn":
        return [module.to_out[0].out_features for module in tapped_modules(unet, tap)]
    return [module.out_channels for module in tapped_modules(unet, tap)]


@contextmanager
def tap_decoder_features(unet: nn.Module, tap: str) -> Iterator[list[torch.Tensor]]:
    """Collect the tapped decoder maps (B, C, H, W) of every UNet forward run inside the block."""
    features: list[torch.Tensor] = []
    handles = []
    if tap == "attn":
        # attn1 returns tokens (B, H*W, C); the spatial size is read from the Transformer2DModel's input.
        for block in unet.up_blocks:
            for attention in getattr(block, "attentions", None) or []:
                size: dict[str, tuple[int, int]] = {}

                def remember_size(_module, args, kwargs, size=size):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    size["hw"] = tuple(hidden.shape[-2:])

                def keep_tokens(_module, _args, output, size=size):
                    batch, tokens, channels = output.shape
                    height, width = size["hw"]
                    assert tokens == height * width, "attention tokens do not match the block's spatial size"
                    features.append(output.transpose(1, 2).reshape(batch, channels, height, width))

                handles.append(attention.register_forward_pre_hook(remember_size, with_kwargs=True))
                handles.append(attention.transformer_blocks[0].attn1.register_forward_hook(keep_tokens))
    else:
        for module in tapped_modules(unet, tap):
            handles.append(module.register_forward_hook(lambda _m, _a, output: features.append(output)))
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ControlledOutput:
    noise_pred: torch.Tensor  # the UNet's prediction (epsilon or v)
    features: list[torch.Tensor]  # tapped decoder maps in tap order (empty when tap is None)
    time_embedding: torch.Tensor  # the UNet's embedding of the probe's timesteps (t, or 999 - t for step-index heads)


class ControlledUNet(nn.Module):
    """Trainable ControlNet feeding residuals into a frozen UNet; one call = one denoising forward pass.

    controlnet=None runs the UNet alone (probe pretraining without a ControlNet). probe_timesteps maps t to the
    timesteps the probe embeds (ControlProbe.probe_timesteps; None = t itself, the UNet's own embedding)."""

    def __init__(
        self,
        unet: nn.Module,
        controlnet: nn.Module | None,
        tap: str | None = "attn",
        probe_timesteps: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.tap = tap
        self.probe_timesteps = probe_timesteps
        self.unet.requires_grad_(False)

    def time_embedding(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The UNet's own embedding of t (B, 4 x base width; 1280 for SD1.5)."""
        projected = self.unet.time_proj(timesteps).to(dtype)
        return self.unet.time_embedding(projected)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt: torch.Tensor | PromptEmbeddings,
        control_image: torch.Tensor,
        conditioning_scale: float = 1.0,
        tap: str | None = "default",
    ) -> ControlledOutput:
        """prompt: the family's PromptEmbeddings (SDXL's added conditioning included), or SD1.5 text states alone."""
        tap = self.tap if tap == "default" else tap
        if not isinstance(prompt, PromptEmbeddings):
            prompt = PromptEmbeddings(prompt)
        conditioning = dict(encoder_hidden_states=prompt.hidden_states, added_cond_kwargs=prompt.added_cond_kwargs)
        down_residuals, mid_residual = None, None
        if self.controlnet is not None:
            down_residuals, mid_residual = self.controlnet(
                noisy_latents,
                timesteps,
                **conditioning,
                controlnet_cond=control_image,
                conditioning_scale=conditioning_scale,
                return_dict=False,
            )
            # A ControlNet prepared by accelerate under mixed precision returns fp32 residuals; the frozen UNet
            # runs in its own (half) dtype outside autocast, so they are cast to it.
            dtype = self.unet.dtype
            down_residuals = [residual.to(dtype) for residual in down_residuals]
            mid_residual = mid_residual.to(dtype)
        time_embedding: list[torch.Tensor] = []
        hook = self.unet.time_embedding.register_forward_hook(lambda _m, _a, out: time_embedding.append(out))
        try:
            if tap is None:
                features: list[torch.Tensor] = []
                noise_pred = self._unet(noisy_latents, timesteps, conditioning, down_residuals, mid_residual)
            else:
                with tap_decoder_features(self.unet, tap) as features:
                    noise_pred = self._unet(noisy_latents, timesteps, conditioning, down_residuals, mid_residual)
        finally:
            hook.remove()
        embedding = time_embedding[0]
        if self.probe_timesteps is not None:
            embedding = self.time_embedding(self.probe_timesteps(timesteps), embedding.dtype)
        return ControlledOutput(noise_pred=noise_pred, features=list(features), time_embedding=embedding)

    def _unet(self, sample, timesteps, conditioning, down_residuals, mid_residual):
        return self.unet(
            sample,
            timesteps,
            **conditioning,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
            return_dict=False,
        )[0]
