"""The InnerControl objective (DESIGN sections 1 and 3):

    loss = diffusion_weight * diffusion_mse (optionally weighted per timestep: loss.diffusion_weighting)
         + reward_weight * reward_loss[t in reward_window]
         + alignment_weight * alignment_loss[t in alignment_window]

An option of ours (loss.corrective_fraction, default 0) changes the noisy latents the terms see: corrective_noise.
Window terms are computed on the in-window samples alone: no VAE decode, condition model or probe
runs for samples outside the window, and a batch with none costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from innercontrol.reward import SplitReward, cycle_losses, per_sample_mse, row_indexer


def in_window(timesteps: torch.Tensor, window) -> torch.Tensor:
    """Boolean mask of samples with window[0] <= t <= window[1]."""
    low, high = window
    return (timesteps >= low) & (timesteps <= high)


def window_indices(timesteps: torch.Tensor, window, host_timesteps: Optional[torch.Tensor] = None) -> list[int]:
    """Host list of the in-window sample indices.

    Pass host_timesteps (a CPU copy of the timesteps, e.g. sampled on the CPU) to avoid reading the device
    tensor back, which would make the host wait for every queued kernel.
    """
    source = host_timesteps if host_timesteps is not None else timesteps
    return in_window(source.cpu(), window).nonzero(as_tuple=True)[0].tolist()


def _zero(reference: torch.Tensor) -> torch.Tensor:
    return reference.new_zeros((), dtype=torch.float32)


TIMESTEP_SAMPLING = ("uniform", "cubic")


def sample_timesteps(batch_size: int, num_train_timesteps: int, scheme: str = "uniform") -> torch.Tensor:
    """Training timesteps (on the host) for a batch.

    uniform: every t equally likely, as Stable Diffusion, ControlNet, ControlNet++ and InnerControl train.
    cubic: t = (1 - u^3) T with u uniform (T2I-Adapter's non-uniform sampling, section 3.4 of its paper): 79% of the
    samples lie above T/2, where the layout of the image is decided.
    """
    if scheme == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,))
    if scheme == "cubic":
        u = torch.rand(batch_size, dtype=torch.float64)
        return ((1 - u**3) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    raise ValueError(f"unknown timestep sampling '{scheme}' (one of {', '.join(TIMESTEP_SAMPLING)})")


def corrective_rows(host_timesteps: torch.Tensor, fraction: float, window) -> torch.Tensor:
    """Host boolean mask of the samples that corrective_noise rebuilds: each sample whose t lies in `window`, chosen
    with probability `fraction`. Draws from torch's global generator only when fraction > 0, so the published
    objective (fraction 0) consumes the same random numbers as before the option existed."""
    if fraction <= 0:
        return torch.zeros(len(host_timesteps), dtype=torch.bool)
    return (torch.rand(len(host_timesteps)) < fraction) & in_window(host_timesteps, window)


def corrective_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, rows
) -> torch.Tensor:
    """The noise that puts another sample's image under each chosen row's noisy latent (loss.corrective_fraction).

    For a chosen row i, with a = alpha_bar_t and j = i - 1 (the batch rolled by one), it returns
    noise_i + sqrt(a) / sqrt(1 - a) * (latents_j - latents_i), so that
        sqrt(a) * latents_i + sqrt(1 - a) * returned  ==  sqrt(a) * latents_j + sqrt(1 - a) * noise_i:
    the noisy latent shows sample j's layout, while the target built from (latents_i, returned noise), epsilon or v,
    still leads to sample i's own latent (its x0), the image its control and caption describe. Rows not chosen keep
    their noise. A batch of one row has no other sample: nothing changes.
    """
    rows = torch.as_tensor(rows, device=latents.device).view(-1, *([1] * (latents.dim() - 1)))
    alpha = alphas_cumprod.to(latents.device)[timesteps].float().view_as(rows)
    shift = (alpha.sqrt() / (1 - alpha).sqrt()) * (latents.roll(1, dims=0) - latents)
    return torch.where(rows, noise + shift, noise)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Epsilon, or v = sqrt(a) eps - sqrt(1 - a) x0 for v-prediction schedulers."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type '{kind}' (epsilon or v_prediction)")


DIFFUSION_WEIGHTINGS = ("uniform", "v")


def timestep_weights(
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    scheme: str = "uniform",
    cap: float = 50.0,
    prediction_type: str = "epsilon",
) -> Optional[torch.Tensor]:
    """Per-sample weights of the denoising MSE; None for the plain mean.

    uniform: none (Stable Diffusion's, ControlNet's and InnerControl's training).
    v: the epsilon MSE times min(1 / alpha_bar_t, cap), divided by that factor's mean over every training t.
    epsilon MSE / alpha_bar_t is the MSE of the implied v (Salimans & Ho's "SNR + 1" weighting of the x0 error):
    under SD1.5's schedule it grows from 1 at t = 0 to 215 at t = 999, so the high-noise steps, where sampling sets
    the layout, weigh more and the nearly clean ones less; truncated at cap, with mean weight 1 over uniform t. A
    v-prediction model's MSE already is the v MSE (epsilon MSE / alpha_bar_t): its weight is min(1, cap alpha_bar_t)
    over that factor's mean (uniform for a cap above every 1 / alpha_bar_t).
    """
    if scheme == "uniform":
        return None
    if scheme != "v":
        raise ValueError(f"unknown diffusion weighting '{scheme}' (one of {', '.join(DIFFUSION_WEIGHTINGS)})")
    alphas = alphas_cumprod.to(timesteps.device, torch.float32)
    factor = torch.clamp(1 / alphas, max=cap)
    if prediction_type == "v_prediction":
        factor = factor * alphas
    return factor[timesteps] / factor.mean()


def diffusion_loss(
    model_pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Denoising MSE over the whole batch; with per-sample `weights` (timestep_weights), their weighted mean."""
    if weights is None:
        return F.mse_loss(model_pred.float(), target.float())
    per_sample = (model_pred.float() - target.float()).square().flatten(1).mean(1)
    return (weights * per_sample).mean()


def predict_x0(noisy_latents, model_pred, timesteps, alphas_cumprod, prediction_type="epsilon") -> torch.Tensor:
    """One-step estimate of the clean latent from the model output at t."""
    alpha = alphas_cumprod.to(noisy_latents.device)[timesteps].float().view(-1, 1, 1, 1)
    x_t, out = noisy_latents.float(), model_pred.float()
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha).sqrt() * out) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * out
    raise ValueError(f"unsupported prediction_type '{prediction_type}'")


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
    split: Optional[SplitReward] = None,
    host_timesteps: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, int]:
    """ControlNet++ cycle consistency: MSE(condition(decode(x0_hat)), control), mean over in-window samples.

    split: a SplitReward (innercontrol.reward) computes the in-window samples' reward and its gradient in a pass
    of its own (same value and gradient, less memory, a CUDA graph on CUDA); None keeps it in the main graph.
    subset=False reproduces the anchors' way (decode and condition model on the whole batch, then mask);
    it gives the same value and exists for the benchmark and the equivalence test.
    Returns (loss, number of in-window samples).
    """
    index = window_indices(timesteps, window, host_timesteps)
    count = len(index)
    if not subset:
        mask = in_window(timesteps, window).float()
        x0 = predict_x0(noisy_latents, model_pred, timesteps, alphas_cumprod, prediction_type)
        losses = cycle_losses(x0, control, vae, condition) * mask
        return losses.sum() / max(count, 1), count
    if count == 0:
        return _zero(model_pred), 0
    if split is not None:
        x0 = predict_x0(noisy_latents, model_pred, timesteps, alphas_cumprod, prediction_type)
        return split(x0, control, index), count
    rows = row_indexer(index, model_pred.device)
    x0 = predict_x0(noisy_latents[rows], model_pred[rows], timesteps[rows], alphas_cumprod, prediction_type)
    return cycle_losses(x0, control[rows], vae, condition).mean(), count


def alignment_loss(
    probe,
    features: list[torch.Tensor],
    time_embedding: torch.Tensor,
    control: torch.Tensor,
    timesteps: torch.Tensor,
    condition,
    window,
    host_timesteps: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, int]:
    """InnerControl alignment: probe(features, t) vs the input control, mean over in-window samples.

    The probe output (in [-1, 1]) is mapped to [0, 1], normalised per condition, resized to the control's
    resolution and compared by per-sample MSE. Returns (loss, number of in-window samples).
    """
    index = window_indices(timesteps, window, host_timesteps)
    if not index:
        return _zero(control), 0
    rows = row_indexer(index, control.device)
    prediction = probe([f[rows] for f in features], time_embedding[rows])
    return alignment_error(prediction, control[rows], condition).mean(), len(index)


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
    diffusion_weighting: str = "uniform"  # timestep_weights's scheme
    diffusion_weight_max: float = 50.0
    diffusion_weight: float = 1.0  # multiplier of the denoising term in the sum
    corrective_fraction: float = 0.0  # share of in-window samples noised from another image (corrective_noise)
    corrective_window: tuple[int, int] = (500, 999)

    @classmethod
    def from_config(cls, loss_cfg) -> LossWeights:
        return cls(
            float(loss_cfg.reward_weight),
            tuple(loss_cfg.reward_window),
            float(loss_cfg.alignment_weight),
            tuple(loss_cfg.alignment_window),
            loss_cfg.diffusion_weighting,
            float(loss_cfg.diffusion_weight_max),
            float(loss_cfg.diffusion_weight),
            float(loss_cfg.corrective_fraction),
            tuple(loss_cfg.corrective_window),
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
    split: Optional[SplitReward] = None,
    host_timesteps: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Every term of the objective, computed from one ControlledUNet output; 'loss' is the weighted sum.

    A term with weight 0 is skipped (plain ControlNet: both 0; ControlNet++: alignment 0). split: see
    reward_loss; host_timesteps: a CPU copy of timesteps, so the windows are chosen without a device read.
    """
    sample_weights = timestep_weights(
        timesteps,
        scheduler.alphas_cumprod,
        weights.diffusion_weighting,
        weights.diffusion_weight_max,
        scheduler.config.prediction_type,
    )
    terms = {"diffusion": diffusion_loss(output.noise_pred, target, sample_weights)}
    total = weights.diffusion_weight * terms["diffusion"]  # the terms are logged before their weights
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
            split=split,
            host_timesteps=host_timesteps,
        )
        terms["reward_samples"] = torch.tensor(float(n_reward))
        total = total + weights.reward_weight * terms["reward"]
    if weights.alignment_weight > 0:
        terms["alignment"], n_align = alignment_loss(
            probe,
            output.features,
            output.time_embedding,
            control,
            timesteps,
            condition,
            weights.alignment_window,
            host_timesteps,
        )
        terms["alignment_samples"] = torch.tensor(float(n_align))
        total = total + weights.alignment_weight * terms["alignment"]
    terms["loss"] = total
    return terms
