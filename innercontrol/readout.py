"""Probe readout during sampling: what the probe reads from the UNet's decoder at each denoising step.

with tap_decoder_features(pipe.unet, probe.config.tap) as features:
    readout = ProbeReadout(probe, features, batch_size=len(prompts))
    pipe(prompts, image=controls, callback_on_step_end=readout, ...)
readout.predictions[step]   # (t, probe output (B, 3, h, w) in [-1, 1])
"""

from __future__ import annotations

import torch


class ProbeReadout:
    """A diffusers `callback_on_step_end` that runs the probe on the features tapped during the step's UNet call."""

    def __init__(self, probe, features: list[torch.Tensor], batch_size: int):
        self.probe = probe
        self.features = features  # filled by tap_decoder_features during each UNet call
        self.batch_size = batch_size
        self.predictions: dict[int, tuple[int, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        # Under classifier-free guidance the UNet batch is [unconditional; conditional]: read the conditional half.
        taps = [feature[-self.batch_size :] for feature in self.features]
        unet = pipeline.unet
        t = self.probe.probe_timesteps(torch.full((self.batch_size,), int(timestep), device=taps[0].device))
        embedding = unet.time_embedding(unet.time_proj(t).to(unet.dtype))
        self.predictions[step] = (int(timestep), self.probe(taps, embedding).float().cpu())
        self.features.clear()
        return {}
