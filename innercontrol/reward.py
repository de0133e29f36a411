"""The cycle-consistency reward computed apart from the UNet's autograd graph, optionally from a CUDA graph.

The reward of an in-window sample depends on the trainable ControlNet only through x0_hat, the one-step estimate
of the clean latent. So its gradient factors exactly (chain rule):

    d reward / d theta = (d reward / d x0_hat) . (d x0_hat / d theta)

`SplitReward` computes the per-sample losses l_i and g_i = d l_i / d x0_hat_i in a pass of its own (VAE decode ->
condition model -> MSE, forward and backward) right when x0_hat is known, and returns the term

    (sum_i l_i + sum_i <x0_hat_i, g_i> - sum_i <stop_grad(x0_hat_i), g_i>) / count

whose value is the mean reward and whose gradient is the reward's gradient. Two things follow:
  * the decoder's and the condition model's activations are freed before the UNet backward (lower peak memory);
  * on CUDA, that pass has fixed shapes per sample, so it is captured once as a CUDA graph (forward and backward)
    and replayed once per in-window sample: one launch instead of thousands of small kernel launches, which on a
    fast GPU made the fixed cost of even one in-window sample a large part of the reward's cost.

If the capture fails (an operation that cannot be captured in a custom condition model, say), the pass runs
eagerly and a warning names the error; the result is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def decode_to_image(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of SD latents to RGB in [0, 1]."""
    latents = latents / vae.config.scaling_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension: (B, ...) -> (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def cycle_losses(x0: torch.Tensor, control: torch.Tensor, vae, condition) -> torch.Tensor:
    """Per-sample cycle-consistency loss MSE(condition(decode(x0)), control): (B,4,h,w), (B,3,H,W) -> (B,)."""
    predicted_control = condition(decode_to_image(vae, x0))
    if predicted_control.shape[-2:] != control.shape[-2:]:
        predicted_control = F.interpolate(predicted_control, size=control.shape[-2:], mode="bilinear")
    return per_sample_mse(predicted_control, control)


class _CapturedPass:
    """One CUDA graph of losses_and_gradients for fixed input shapes, with its static input and output tensors."""

    def __init__(self, run, x0: torch.Tensor, control: torch.Tensor, scale: torch.Tensor, warmup: int = 3):
        self.x0, self.control, self.scale = x0.detach().clone(), control.detach().clone(), scale.detach().clone()
        side = torch.cuda.Stream(device=x0.device)
        side.wait_stream(torch.cuda.current_stream(x0.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires (cuDNN/cuBLAS setup)
            for _ in range(warmup):
                run(self.x0, self.control, self.scale)
        torch.cuda.current_stream(x0.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        reserved = torch.cuda.memory_reserved(x0.device)
        with torch.cuda.graph(self.graph):
            self.losses, self.grad = run(self.x0, self.control, self.scale)
        # The graph's private memory pool: reserved for its replays, not counted by memory_allocated().
        self.pool_bytes = torch.cuda.memory_reserved(x0.device) - reserved

    def __call__(self, x0: torch.Tensor, control: torch.Tensor, scale: torch.Tensor):
        self.x0.copy_(x0)
        self.control.copy_(control)
        self.scale.copy_(scale)
        self.graph.replay()
        return self.losses.clone(), self.grad.clone()


class SplitReward:
    """Reward term of the in-window samples with its gradient computed in a separate pass (see the module doc).

    cuda_graph: on CUDA, capture the pass for one sample and replay it per in-window sample (ignored on the CPU).
    scaler: the fp16 GradScaler (accelerator.scaler); the inner backward is scaled by its current scale, as the
    outer one is, so that fp16 gradients inside the VAE and condition model do not underflow.
    """

    def __init__(self, vae, condition, cuda_graph: bool = True, scaler=None):
        self.vae, self.condition, self.scaler = vae, condition, scaler
        self.cuda_graph = cuda_graph
        self.graphs: dict[tuple, _CapturedPass] = {}
        self.capture_error: Optional[str] = None

    def _losses_and_gradients(self, x0: torch.Tensor, control: torch.Tensor, scale: torch.Tensor):
        # Own saved-tensor hooks (identity): outer hooks such as save_on_cpu would offload this pass's
        # activations although its backward runs right here (and a host copy cannot be captured in a graph).
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            x = x0.detach().float().requires_grad_(True)
            losses = cycle_losses(x, control, self.vae, self.condition)
            (grad,) = torch.autograd.grad((losses * scale).sum(), x)
        return losses.detach(), grad / scale

    def _scale(self, device: torch.device) -> torch.Tensor:
        one = torch.ones((), device=device)
        if self.scaler is not None and getattr(self.scaler, "is_enabled", lambda: False)():
            return self.scaler.scale(one).float()  # the current loss scale, without a host sync
        return one

    def _graphed(self, x0: torch.Tensor, control: torch.Tensor, scale: torch.Tensor) -> Optional[_CapturedPass]:
        if not self.cuda_graph or self.capture_error is not None or x0.device.type != "cuda":
            return None
        key = (tuple(x0.shape), tuple(control.shape), x0.dtype, control.dtype, x0.device)
        if key not in self.graphs:
            try:
                self.graphs[key] = _CapturedPass(self._losses_and_gradients, x0, control, scale)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager pass
                self.capture_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                logger.warning(
                    "reward: CUDA graph capture failed (%s); computing the reward eagerly (same result, more "
                    "launch overhead). Set model.reward_cuda_graph=false to skip the attempt.",
                    self.capture_error,
                )
                return None
        return self.graphs[key]

    def __call__(self, x0: torch.Tensor, control: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
        """Mean reward over the samples `index` (host ints) of x0 (B,4,h,w, differentiable) and control (B,3,H,W)."""
        if len(index) == 0:
            return x0.new_zeros((), dtype=torch.float32)
        with torch.autocast(x0.device.type, enabled=False):  # the models carry their own dtypes
            scale = self._scale(x0.device)
            graph = self._graphed(x0[:1].detach().float(), control[:1], scale)
            term = x0.new_zeros((), dtype=torch.float32)
            if graph is not None:
                for i in index:  # one replay per sample; python-int slices need no device index (no host sync)
                    losses, grad = graph(x0[i : i + 1].detach().float(), control[i : i + 1], scale)
                    term = term + self._surrogate(x0[i : i + 1], losses, grad)
            else:
                rows = slice(None) if len(index) == x0.shape[0] else device_index(index, x0.device)
                x0_in, control_in = x0[rows], control[rows]
                losses, grad = self._losses_and_gradients(x0_in, control_in, scale)
                term = self._surrogate(x0_in, losses, grad)
        return term / len(index)

    @property
    def graph_pool_bytes(self) -> int:
        """Device memory reserved by the captured graphs' private pools (0 without graphs)."""
        return sum(graph.pool_bytes for graph in self.graphs.values())

    @staticmethod
    def _surrogate(x0: torch.Tensor, losses: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Value sum(losses) (the two inner products cancel exactly), gradient sum(grad) w.r.t. x0."""
        x0 = x0.float()
        return losses.sum() + (x0 * grad).sum() - (x0.detach() * grad).sum()


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to the device without waiting for queued kernels (pinned, non-blocking on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def device_index(index: Sequence[int], device: torch.device) -> torch.Tensor:
    """Host ints -> a device index tensor, copied without a host sync."""
    return host_to_device(torch.tensor(list(index), dtype=torch.long), device)
