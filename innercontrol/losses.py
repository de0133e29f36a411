"""The InnerControl objective (DESIGN sections 1 and 3):

    loss = diffusion_mse + reward_weight * reward_loss[t in reward_window]
                         + alignment_weight * alignment_loss[t in alignment_window]

Window terms are computed on the in-window samples alone: no VAE decode, condition model or probe
runs for samples outside the window, and a batch with none costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def in_window(timesteps: torch.Tensor, window) -> torch.Tensor:
    """Boolean mask of samples with window[0] <= t <= window[1]."""
    low, high = window
    return (timesteps >= low) & (timesteps <= high)


def _zero(reference: torch.Tensor) -> torch.Tensor:
    return reference.new_zeros((), dtype=torch.float32)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension: (B, ...) -> (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Epsilon, or v = sqrt(a) eps - sqrt(1 - a) x0 for v-prediction schedulers."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type '{kind}' (epsilon or v_prediction)")


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain denoising MSE over the whole batch."""
    return F.mse_loss(model_pred.float(), target.float())


def predict_x0(noisy_latents, model_pred, timesteps, alphas_cumprod, prediction_type="epsilon") -> torch.Tensor:
    """One-step estimate of the clean latent from the model output at t."""
    alpha = alphas_cumprod.to(noisy_latents.device)[timesteps].float().view(-1, 1, 1, 1)
    x_t, out = noisy_latents.float(), model_pred.float()
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha).sqrt() * out) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * out
    raise ValueError(f"unsupported prediction_type '{prediction_type}'")


def decode_to_image(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of SD latents to RGB in [0, 1]."""
    latents = latents / vae.config.scaling_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def reward_loss(
    noisy_latents: torch.Tensor,
    model_pred: torch.Tensor,
    timesteps: torch.Tensor,
    control: torch.Tensor,
    vae,
    condition,
    alphas_cumprod: torch.Tensor,
    window,
    prediction_type: str = "epsilon",
    subset: bool = True,
) -> tuple[torch.Tensor, int]:
    """ControlNet++ cycle consistency: MSE(condition(decode(x0_hat)), control), mean over in-window samples.

    subset=False reproduces the anchors' way (decode and condition model on the whole batch, then mask);
    it gives the same value and exists for the benchmark and the equivalence test.
    Returns (loss, number of in-window samples).
    """
    mask = in_window(timesteps, window)
    count = int(mask.sum())
    if count == 0 and subset:
        return _zero(model_pred), 0
    if subset:
        index = mask.nonzero(as_tuple=True)[0]
        noisy_latents, model_pred, timesteps, control = (
            noisy_latents[index],
            model_pred[index],
            timesteps[index],
            control[index],
        )
    x0 = predict_x0(noisy_latents, model_pred, timesteps, alphas_cumprod, prediction_type)
    predicted_control = condition(decode_to_image(vae, x0))
    if predicted_control.shape[-2:] != control.shape[-2:]:
        predicted_control = F.interpolate(predicted_control, size=control.shape[-2:], mode="bilinear")
    losses = per_sample_mse(predicted_control, control)
    if not subset:
        losses = losses * mask.float()
    return losses.sum() / max(count, 1), count


def alignment_loss(
    probe,
    features: list[torch.Tensor],
    time_embedding: torch.Tensor,
    control: torch.Tensor,
    timesteps: torch.Tensor,
    condition,
    window,
) -> tuple[torch.Tensor, int]:
    """InnerControl alignment: probe(features, t) vs the input control, mean over in-window samples.

    The probe output (in [-1, 1]) is mapped to [0, 1], normalised per condition, resized to the control's
    resolution and compared by per-sample MSE. Returns (loss, number of in-window samples).
    """
    mask = in_window(timesteps, window)
    count = int(mask.sum())
    if count == 0:
        return _zero(control), 0
    index = mask.nonzero(as_tuple=True)[0]
    prediction = probe([f[index] for f in features], time_embedding[index])
    return alignment_error(prediction, control[index], condition).mean(), count


def alignment_error(prediction: torch.Tensor, control: torch.Tensor, condition) -> torch.Tensor:
    """Per-sample alignment MSE of a probe output (in [-1, 1]) against the control, in the condition's normalisation."""
    prediction = condition.normalize_probe_output((prediction.float() + 1) / 2)
    label = condition.normalize_label(control.float())
    if prediction.shape[-2:] != label.shape[-2:]:
        prediction = F.interpolate(prediction, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return per_sample_mse(prediction, label)


@dataclass
class LossWeights:
    reward_weight: float
    reward_window: tuple[int, int]
    alignment_weight: float
    alignment_window: tuple[int, int]

    @classmethod
    def from_config(cls, loss_cfg) -> LossWeights:
        return cls(
            float(loss_cfg.reward_weight),
            tuple(loss_cfg.reward_window),
            float(loss_cfg.alignment_weight),
            tuple(loss_cfg.alignment_window),
        )


def innercontrol_objective(
    output,
    target: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    control: torch.Tensor,
    weights: LossWeights,
    scheduler,
    vae=None,
    condition=None,
    probe=None,
) -> dict[str, torch.Tensor]:
    """Every term of the objective, computed from one ControlledUNet output; 'loss' is the weighted sum.

    A term with weight 0 is skipped (plain ControlNet: both 0; ControlNet++: alignment 0).
    """
    terms = {"diffusion": diffusion_loss(output.noise_pred, target)}
    total = terms["diffusion"]
    if weights.reward_weight > 0:
        terms["reward"], n_reward = reward_loss(
            noisy_latents,
            output.noise_pred,
            timesteps,
            control,
            vae,
            condition,
            scheduler.alphas_cumprod,
            weights.reward_window,
            scheduler.config.prediction_type,
        )
        terms["reward_samples"] = torch.tensor(float(n_reward))
        total = total + weights.reward_weight * terms["reward"]
    if weights.alignment_weight > 0:
        terms["alignment"], n_align = alignment_loss(
            probe, output.features, output.time_embedding, control, timesteps, condition, weights.alignment_window
        )
        terms["alignment_samples"] = torch.tensor(float(n_align))
        total = total + weights.alignment_weight * terms["alignment"]
    terms["loss"] = total
    return terms
