"""The cycle-consistency reward computed apart from the UNet's autograd graph, optionally from a CUDA graph.

The reward of an in-window sample depends on the trainable ControlNet only through x0_hat, the one-step estimate
of the clean latent. So its gradient factors exactly (chain rule):

    d reward / d theta = (d reward / d x0_hat) . (d x0_hat / d theta)

`SplitReward` computes the per-sample losses l_i and g_i = d l_i / d x0_hat_i in a pass of its own (VAE decode ->
condition model -> MSE, forward and backward) right when x0_hat is known, and returns the term

    sum_i l_i / count,  with  d term / d x0_hat_i := g_i / count  (a custom autograd function),

whose value is the mean reward and whose gradient is the reward's gradient. Two things follow:
  * the decoder's and the condition model's activations are freed before the UNet backward (lower peak memory);
  * on CUDA, the pass has fixed shapes for a given number of samples, so it is captured as a CUDA graph (forward
    and backward) for chunks of 1, 2, 4, ... samples (up to max_chunk, each size captured the first time it is
    needed, all sharing one memory pool) and the in-window samples are replayed chunk by chunk (3 = 2 + 1): a few
    launches instead of thousands of small kernel launches, which on a fast GPU made the fixed cost of even one
    in-window sample a large part of the reward's cost (bench/RESULTS.md).

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
    """Per-sample cycle-consistency loss MSE(condition(decode(x0)), control), each side in the condition's reward
    normalisation (Condition.reward_prediction / reward_label): (B,4,h,w), (B,3,H,W) -> (B,)."""
    predicted_control = condition.reward_prediction(decode_to_image(vae, x0))
    label = condition.reward_label(control)
    if predicted_control.shape[-2:] != label.shape[-2:]:
        predicted_control = F.interpolate(predicted_control, size=label.shape[-2:], mode="bilinear")
    return per_sample_mse(predicted_control, label)


def chunk_sizes(count: int, max_chunk: int) -> list[int]:
    """Split `count` samples into power-of-two chunks of at most max_chunk, largest first (7, 4 -> [4, 2, 1])."""
    largest = 1 << (max(1, max_chunk).bit_length() - 1)
    sizes = []
    while count > 0:
        size = min(largest, 1 << (count.bit_length() - 1))
        sizes.append(size)
        count -= size
    return sizes


class _CapturedPass:
    """One CUDA graph of the reward pass for fixed input shapes, with its static input and output tensors."""

    def __init__(self, run, x0, control, scale, pool, warmup: int = 3):
        self.x0, self.control, self.scale = x0.detach().clone(), control.detach().clone(), scale.detach().clone()
        device = x0.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires (cuDNN/cuBLAS setup)
            for _ in range(warmup):
                run(self.x0, self.control, self.scale)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # so that the growth of reserved memory below is the graph pool's alone
        reserved = torch.cuda.memory_reserved(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.losses, self.grad = run(self.x0, self.control, self.scale)
        # Memory the shared graph pool grew by: reserved for replays, not counted by memory_allocated().
        self.pool_bytes = max(0, torch.cuda.memory_reserved(device) - reserved)

    def __call__(self, x0: torch.Tensor, control: torch.Tensor, scale: torch.Tensor):
        self.x0.copy_(x0)
        self.control.copy_(control)
        self.scale.copy_(scale)
        self.graph.replay()
        return self.losses.clone(), self.grad.clone()


class SplitReward:
    """Reward term of the in-window samples with its gradient computed in a separate pass (see the module doc).

    cuda_graph: on CUDA, capture the pass once per chunk size (powers of two up to max_chunk, as needed; one shared
    memory pool) and replay it chunk by chunk over the in-window samples. Ignored on the CPU.
    scaler: the fp16 GradScaler (accelerator.scaler); the inner backward is scaled by its current scale, as the
    outer one is, so that fp16 gradients inside the VAE and condition model do not underflow.
    """

    def __init__(self, vae, condition, cuda_graph: bool = True, max_chunk: int = 4, scaler=None):
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        self.vae, self.condition, self.scaler = vae, condition, scaler
        self.cuda_graph, self.max_chunk = cuda_graph, max_chunk
        self.graphs: dict[tuple, _CapturedPass] = {}
        self.capture_error: Optional[str] = None
        self._pool = None

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
        key = (tuple(x0.shape), tuple(control.shape), x0.dtype, control.dtype, x0.device)
        if key not in self.graphs:
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                self.graphs[key] = _CapturedPass(self._losses_and_gradients, x0, control, scale, self._pool)
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
        index = list(index)
        if not index:
            return x0.new_zeros((), dtype=torch.float32)
        with torch.autocast(x0.device.type, enabled=False):  # the models carry their own dtypes
            scale = self._scale(x0.device)
            use_graph = self.cuda_graph and self.capture_error is None and x0.device.type == "cuda"
            term = x0.new_zeros((), dtype=torch.float32)
            start = 0
            for size in chunk_sizes(len(index), self.max_chunk) if use_graph else []:
                rows = row_indexer(index[start : start + size], x0.device)
                x0_in, control_in = x0[rows], control[rows]
                x0_value = x0_in.detach().float()
                graph = self._graphed(x0_value, control_in, scale)
                if graph is None:
                    break
                losses, grad = graph(x0_value, control_in, scale)
                term = term + self._surrogate(x0_in, losses, grad)
                start += size
            if start < len(index):  # eager: the rest (all of it without graphs) in one batch
                rows = row_indexer(index[start:], x0.device)
                x0_in, control_in = x0[rows], control[rows]
                losses, grad = self._losses_and_gradients(x0_in, control_in, scale)
                term = term + self._surrogate(x0_in, losses, grad)
        return term / len(index)

    def capture_all(self, x0: torch.Tensor, control: torch.Tensor) -> list[int]:
        """Capture the graph of every chunk size now (else each is captured the first time it is needed).

        x0 (B,4,h,w) and control (B,3,H,W) are examples with B >= max_chunk; returns the chunk sizes captured.
        """
        if not (self.cuda_graph and x0.device.type == "cuda"):
            return []
        with torch.autocast(x0.device.type, enabled=False):
            scale = self._scale(x0.device)
            sizes = [1 << k for k in range(self.max_chunk.bit_length()) if 1 << k <= min(self.max_chunk, len(x0))]
            for size in sizes:
                if self._graphed(x0[:size].detach().float(), control[:size], scale) is None:
                    return []
        return sizes

    @property
    def chunk_sizes_captured(self) -> list[int]:
        return sorted(key[0][0] for key in self.graphs)

    @property
    def graph_pool_bytes(self) -> int:
        """Device memory reserved by the captured graphs' shared private pool (0 without graphs)."""
        return sum(graph.pool_bytes for graph in self.graphs.values())

    @staticmethod
    def _surrogate(x0: torch.Tensor, losses: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Value sum(losses); gradient grad w.r.t. x0 (the value does not depend on grad, even a non-finite one)."""
        return _InjectGradient.apply(x0.float(), losses, grad)


class _InjectGradient(torch.autograd.Function):
    """forward(x0, losses, grad) = losses.sum(); backward passes upstream * grad to x0.

    A product such as <x0, grad> - <stop_grad(x0), grad> would give the same gradient, but an inner backward that
    overflowed in fp16 (inf in grad, a normal event under dynamic loss scaling) would turn the loss value into NaN;
    here the value stays the reward and the inf reaches the ControlNet's gradients, where the GradScaler sees it
    and skips the step, as it does with the anchors' single backward.
    """

    @staticmethod
    def forward(ctx, x0, losses, grad):
        ctx.save_for_backward(grad)
        return losses.sum()

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return upstream * grad, None, None


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to the device without waiting for queued kernels (pinned, non-blocking on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def row_indexer(index: list[int], device: torch.device):
    """Indexer of the given rows: a slice when they are consecutive, e.g. the whole batch (no gather copy and no
    copy to the device), else an index tensor."""
    if index == list(range(index[0], index[0] + len(index))):
        return slice(index[0], index[0] + len(index))
    return device_index(index, device)


def device_index(index: Sequence[int], device: torch.device) -> torch.Tensor:
    """Host ints -> a device index tensor, copied without a host sync."""
    return host_to_device(torch.tensor(list(index), dtype=torch.long), device)
