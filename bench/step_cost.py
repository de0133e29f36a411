"""Cost of one ControlNet training step with each loss term of the InnerControl objective.

Rows (same seeded timesteps for every row; rows interleaved step by step so drift hits all alike):
  a  plain ControlNet (diffusion loss)
  b  + reward loss, whole batch decoded then masked (the anchors' way)
  c  + reward loss on the in-window subset (ours: a split pass, replayed from a CUDA graph on CUDA)
  d  + alignment loss (probe on decoder attention taps)
  e  full InnerControl (subset reward + alignment)
  b200/c200  b and c at the HED/lineart reward window t <= 200
  c200e/c200i  (CUDA only) c200 with the split pass run eagerly / with the reward inside the main autograd graph
Windows otherwise those of the depth experiment: reward [0, 400], alignment [0, 920].

    python bench/step_cost.py                                   # tiny preset, CPU
    python bench/step_cost.py --preset sd15 --resolution 256 --batch-size 4 --steps 4   # SD1.5 shapes, CPU
    python bench/step_cost.py --preset sd15 --resolution 512 --batch-size 8 --precision bf16 \
        --gradient-checkpointing --device cuda                  # the GPU table
    python bench/step_cost.py --rows a,e --settings fused,channels_last,compile,best --memory-per-sample
    python bench/step_cost.py --preset sdxl --resolution 256 --batch-size 2 --steps 2 --rows a,e --precision bf16 \
        --controlnet-dtype bf16                                 # SDXL shapes on a 24 GB CPU machine
    python bench/step_cost.py --preset sdxl --resolution 1024 --batch-size 2 --precision bf16 \
        --gradient-checkpointing --vae-gradient-checkpointing --device cuda --memory-per-sample   # SDXL, GPU

Every table also gives samples/s, the model FLOPs of a step (torch.utils.flop_counter, no recomputation), TFLOP/s
and the model FLOPs utilisation against the device's dense peak (PEAK_TFLOPS; --peak-tflops overrides), and the
samples/s the data loader delivers alone. --settings measures throughput switches on rows a and e beside the
default in the same run; --memory-per-sample adds the memory per sample with and without gradient checkpointing.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


@dataclass
class Row:
    key: str
    label: str
    reward: str | None  # None, "whole" or "subset"
    reward_window: tuple[int, int]
    alignment: bool
    split: str | None = "graph"  # subset reward: "graph" (CUDA graph where possible), "eager" or None (in graph)
    cuda_only: bool = False
    setting: str = "default"  # throughput setting the row runs under (SETTINGS)


ROWS = [
    Row("a", "plain ControlNet", None, (0, 400), False),
    Row("b", "+ reward, whole batch then mask (anchors)", "whole", (0, 400), False),
    Row("c", "+ reward, in-window subset (ours)", "subset", (0, 400), False),
    Row("d", "+ alignment", None, (0, 400), True),
    Row("e", "full InnerControl (c + d)", "subset", (0, 400), True),
    Row("b200", "+ reward whole batch, window [0,200]", "whole", (0, 200), False),
    Row("c200", "+ reward subset, window [0,200]", "subset", (0, 200), False),
    Row("c200e", "c200, split pass eager (no CUDA graph)", "subset", (0, 200), False, "eager", True),
    Row("c200i", "c200, reward inside the main autograd graph", "subset", (0, 200), False, None, True),
]
ALIGNMENT_WINDOW = (0, 920)
# Throughput settings (--settings) measured on rows a and e beside the default, in the same run (issue 16):
SETTINGS = {
    "fused": "fused AdamW (optim.optimizer=adamw_fused)",
    "adamw8bit": "8-bit AdamW, bitsandbytes (optim.optimizer=adamw_8bit; CUDA)",
    "tf32": "TF32 matmuls for fp32 work (optim.allow_tf32; CUDA, fp32 only)",
    "channels_last": "channels_last UNet + ControlNet (model.channels_last)",
    "compile": "regional torch.compile of the blocks (model.compile)",
    "best": "compile + channels_last + fused AdamW",
}
# Dense peak TFLOP/s (NVIDIA data sheets), by device-name fragment, most specific first, and precision ("tf32": fp32
# work with TF32 matmuls; "fp32": plain fp32, also used for fp32 rows although cuDNN convolutions run in TF32).
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for the precision, or None for a device not in PEAK_TFLOPS."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in device_name:
            return peaks[precision]
    return None


def count_flops(run_step) -> int:
    """Model FLOPs of one step (matmuls, convolutions, attention: what torch.utils.flop_counter counts), forward and
    backward, without recomputation: count with gradient checkpointing off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math attention kernel decomposes into counted matmuls (the CPU's fused kernel has no FLOP formula).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run_step()
    return counter.get_total_flops()


def loader_throughput(resolution: int, batch_size: int, workers: int, batches: int, data: str | None) -> tuple:
    """Samples/s the training data loader delivers (decode, resize, collate; no model), on --data or on a synthetic
    depth set written at the resolution. Returns (samples/s, description)."""
    from innercontrol.config import DataConfig
    from innercontrol.data import build_dataloader
    from innercontrol.synthetic import write_synthetic

    if data is None:
        data = tempfile.mkdtemp(prefix="step_cost_data_")
        write_synthetic(data, num=2 * batch_size * (batches + 1), resolution=resolution, seed=0)
    cfg = DataConfig(dataset=data, resolution=resolution, num_workers=workers, control_column="control_depth")
    loader = iter(build_dataloader(cfg, batch_size, process_index=0, num_processes=1, seed=0))
    next(loader)  # warm-up: opening the dataset, starting workers
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * batch_size / (time.perf_counter() - start)
    return rate, f"{workers} decode workers"


class SavedForBackward:
    """Bytes of tensors autograd keeps for the backward pass (activation memory), counted once per storage."""

    def __enter__(self):
        self.seen, self.bytes = set(), 0

        def pack(tensor):
            key = (tensor.untyped_storage().data_ptr(), tensor.device)
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += tensor.untyped_storage().nbytes()
            return tensor

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def build_models(preset: str, device: torch.device, workdir: str):
    """Random-weight models of the preset's architecture: UNet, VAE, ControlNet (from the UNet), depth reward model,
    training scheduler and the probe's projection width."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import DPTConfig, DPTForDepthEstimation

    from innercontrol import tiny
    from innercontrol.conditions import get_condition

    torch.manual_seed(0)
    if preset == "tiny":
        pipe = tiny.build_tiny_pipeline()
        unet, vae, controlnet = pipe.unet, pipe.vae, pipe.controlnet
        projection_dim = 32
        depth, processor = tiny.build_tiny_dpt()
    else:
        sdxl = preset == "sdxl"
        unet = UNet2DConditionModel(**(tiny.SDXL_BASE_UNET_CONFIG if sdxl else tiny.SD15_UNET_CONFIG))
        # SDXL's VAE has SD's architecture with another latent scale
        vae = AutoencoderKL(**tiny.SD15_VAE_CONFIG, scaling_factor=0.13025 if sdxl else 0.18215)
        controlnet = ControlNetModel.from_unet(unet)
        projection_dim = 384
        # DPT-Hybrid MiDaS architecture (the depth reward model), random weights.
        config = DPTConfig(
            is_hybrid=True, backbone_featmap_shape=[1, 1024, 24, 24], neck_hidden_sizes=[256, 512, 768, 768]
        )
        depth = DPTForDepthEstimation(config)
        from transformers import DPTImageProcessor

        processor = DPTImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    depth.save_pretrained(workdir)
    processor.save_pretrained(workdir)
    condition = get_condition("depth", model_path=workdir, device=str(device), purpose="reward")
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return unet, vae, controlnet, condition, scheduler, projection_dim


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "sd15", "sdxl"), default="tiny")
    parser.add_argument(
        "--resolution", type=int, default=None, help="image size (tiny: 128, sd15: 512, sdxl: 1024 on GPU)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument(
        "--controlnet-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: the trained ControlNet's weights, gradients and AdamW state in bf16 too. Not a training setting "
        "(training keeps fp32 master weights): it lets the sdxl preset (2.6 B frozen + 1.25 B trained parameters) fit "
        "a 24 GB CPU machine; the FLOPs are the same",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the UNet and ControlNet")
    parser.add_argument(
        "--vae-gradient-checkpointing", action="store_true", help="also checkpoint the VAE decoder of the reward"
    )
    parser.add_argument("--no-cuda-graph", action="store_true", help="rows c, e, c200: run the split pass eagerly")
    parser.add_argument("--max-chunk", type=int, default=4, help="largest reward CUDA-graph chunk (samples)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="append the table to this markdown file")
    parser.add_argument("--profile", default="", help="comma-separated rows to profile for one step after the table")
    parser.add_argument(
        "--settings",
        default="",
        help="comma-separated throughput settings measured on rows a and e beside the default: "
        + ", ".join(SETTINGS)
        + ". Each holds its own optimizer state, and channels_last / compile / best their own model copies (SD1.5: "
        "~3 GB and ~9 GB more each), so on a 24 GB machine measure the sd15 preset one setting at a time",
    )
    parser.add_argument("--rows", default="", help="comma-separated rows to run (default: all; a and e always run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for the MFU column")
    parser.add_argument("--data", default=None, help="dataset for the data-loading row (default: a synthetic set)")
    parser.add_argument("--data-workers", type=int, default=4, help="decode workers of the data-loading row")
    parser.add_argument(
        "--memory-per-sample",
        action="store_true",
        help="also measure memory per sample of rows a and e with and without gradient checkpointing",
    )
    args = parser.parse_args(argv)
    settings = [name for name in args.settings.split(",") if name]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown --settings {', '.join(unknown)}: choose from {', '.join(SETTINGS)}")
    if args.controlnet_dtype == "bf16" and args.precision == "fp32":
        parser.error("--controlnet-dtype bf16 runs under bf16 autocast: add --precision bf16")
    if args.batch_size < 2 and args.memory_per_sample:
        parser.error("--memory-per-sample compares batch b/2 with batch b: use --batch-size 2 or more")

    from innercontrol.controlled_unet import ControlledUNet, tapped_channels
    from innercontrol.families import PromptEmbeddings
    from innercontrol.losses import alignment_loss, diffusion_loss, diffusion_target, in_window, reward_loss
    from innercontrol.models import encode_latents
    from innercontrol.probes import build_probe
    from innercontrol.reward import SplitReward, host_to_device

    device = torch.device(args.device)
    wanted = {"a", "e", *filter(None, args.rows.split(","))} if args.rows else {row.key for row in ROWS}
    unknown_rows = wanted - {row.key for row in ROWS}
    if unknown_rows:
        parser.error(f"unknown --rows {', '.join(sorted(unknown_rows))}: choose from {', '.join(r.key for r in ROWS)}")
    rows = [row for row in ROWS if row.key in wanted and (device.type == "cuda" or not row.cuda_only)]
    skipped_settings = {}
    for name in settings:
        if name in ("adamw8bit", "tf32") and device.type != "cuda":
            skipped_settings[name] = "CUDA only"
        elif name == "tf32" and args.precision != "fp32":
            skipped_settings[name] = "only changes fp32 work: run with --precision fp32"
        elif name == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                skipped_settings[name] = "bitsandbytes not installed"
    settings = [name for name in settings if name not in skipped_settings]
    for name in settings:
        for base in ("a", "e"):
            template = next(row for row in ROWS if row.key == base)
            rows.append(replace(template, key=f"{base}-{name}", label=f"{base}, {SETTINGS[name]}", setting=name))
    resolution = args.resolution or {"tiny": 128, "sd15": 512, "sdxl": 1024}[args.preset]
    weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    workdir = tempfile.mkdtemp(prefix="step_cost_")
    unet, vae, controlnet, condition, scheduler, projection_dim = build_models(args.preset, device, workdir)
    for frozen in (unet, vae):
        frozen.requires_grad_(False).to(device, weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    if args.vae_gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    controlnet.to(device, torch.bfloat16 if args.controlnet_dtype == "bf16" else torch.float32).train()
    condition.to(device)
    if condition.model is not None:
        condition.model.to(weight_dtype)
    model = ControlledUNet(unet, controlnet, tap="attn")
    probe = build_probe(tapped_channels(unet, "attn"), projection_dim, unet.config.block_out_channels[0] * 4)
    probe.requires_grad_(False).to(device, weight_dtype).eval()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=args.precision != "fp32")

    # What each setting runs: (ControlledUNet, ControlNet, optimizer, TF32 on). Settings that change the modules
    # (compile, channels_last) run on copies, so the default rows keep the eager, contiguous modules.
    bundles = {"default": (model, controlnet, optimizer, False)}
    for name in settings:
        if name in ("fused", "adamw8bit", "tf32"):
            if name == "fused":
                opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, fused=True)
            elif name == "adamw8bit":
                import bitsandbytes

                opt = bitsandbytes.optim.AdamW8bit(controlnet.parameters(), lr=1e-5)
            else:
                opt = optimizer
            bundles[name] = (model, controlnet, opt, name == "tf32")
            continue
        import copy

        from innercontrol.controlled_unet import tapped_modules
        from innercontrol.speed import compile_blocks, to_channels_last

        unet_copy, controlnet_copy = copy.deepcopy(unet), copy.deepcopy(controlnet)
        if name in ("channels_last", "best"):
            to_channels_last(unet_copy, controlnet_copy)
        if name in ("compile", "best"):
            compile_blocks(unet_copy, keep_eager=tapped_modules(unet_copy, "attn"))
            compile_blocks(controlnet_copy)
        opt = torch.optim.AdamW(controlnet_copy.parameters(), lr=1e-5, fused=name == "best")
        bundles[name] = (ControlledUNet(unet_copy, controlnet_copy, tap="attn"), controlnet_copy, opt, False)

    generator = torch.Generator().manual_seed(args.seed)
    b, latent = args.batch_size, resolution // 8
    timestep_batches = [torch.randint(0, 1000, (b,), generator=generator) for _ in range(args.steps + 1)]
    all_images = torch.rand(b, 3, resolution, resolution, generator=generator).to(device) * 2 - 1
    all_controls = torch.rand(b, 3, resolution, resolution, generator=generator).to(device)
    added = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled text embedding and this size's ids
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added["text_embeds"] = torch.randn(b, pooled_dim, generator=generator)
        added["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * b)
    text = torch.randn(b, 77, unet.config.cross_attention_dim, generator=generator)
    all_text = PromptEmbeddings(text, added).to(device, weight_dtype)
    all_noise = torch.randn(b, 4, latent, latent, generator=generator).to(device)

    splits = {
        "graph": SplitReward(vae, condition, cuda_graph=not args.no_cuda_graph, max_chunk=args.max_chunk),
        "eager": SplitReward(vae, condition, cuda_graph=False),
        None: None,
    }

    # Capture the reward graphs before timing (training captures each chunk size the first time it is needed).
    splits["graph"].capture_all(torch.randn(b, 4, latent, latent, device=device), all_controls)

    def step(row: Row, host_timesteps: torch.Tensor) -> int:
        """One training step of the row on the first len(host_timesteps) samples; the bytes saved for backward."""
        model, controlnet, optimizer, tf32 = bundles[row.setting]
        torch.backends.cuda.matmul.allow_tf32 = tf32  # cuDNN convolutions use TF32 by default (torch's setting)
        n = len(host_timesteps)
        images, controls, noise = (x[:n] for x in (all_images, all_controls, all_noise))
        text = all_text.select(slice(0, n))
        timesteps = host_to_device(host_timesteps, device)
        with torch.no_grad():
            latents = encode_latents(vae, images.to(weight_dtype))
        noisy = scheduler.add_noise(latents.float(), noise, host_timesteps).to(weight_dtype)
        with autocast, SavedForBackward() as saved:
            out = model(noisy, timesteps, text, controls, tap="attn" if row.alignment else None)
            loss = diffusion_loss(out.noise_pred, diffusion_target(scheduler, latents, noise, timesteps))
            if row.reward:
                term, _ = reward_loss(
                    noisy,
                    out.noise_pred,
                    timesteps,
                    controls,
                    vae,
                    condition,
                    scheduler.alphas_cumprod,
                    row.reward_window,
                    subset=row.reward == "subset",
                    split=splits[row.split],
                    host_timesteps=host_timesteps,
                )
                loss = loss + term
            if row.alignment:
                term, _ = alignment_loss(
                    probe,
                    out.features,
                    out.time_embedding,
                    controls,
                    timesteps,
                    condition,
                    ALIGNMENT_WINDOW,
                    host_timesteps,
                )
                loss = loss + term
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return saved.bytes

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {row.key: [] for row in rows}
    peaks = {row.key: 0 for row in rows}
    activations = {row.key: 0 for row in rows}
    for index, timesteps in enumerate(timestep_batches):
        for row in rows:
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            saved_bytes = step(row, timesteps)
            sync()
            elapsed = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
            if row.reward == "subset" and splits[row.split] is not None:
                peak += splits[row.split].graph_pool_bytes  # replays allocate from the graph's own pool
            if index > 0:  # the first step of each row is a warm-up
                times[row.key].append(elapsed)
                peaks[row.key] = max(peaks[row.key], peak)
                activations[row.key] = max(activations[row.key], saved_bytes)
        print(f"step {index}/{args.steps} t={timesteps.tolist()}", flush=True)

    busy = {}
    if device.type == "cuda":
        # Kernel time per step (sum over CUDA kernels, one profiled step per row over the same timesteps):
        # what a row costs when the GPU, not the Python/launch side, is the bottleneck (slower GPUs).
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        for row in rows:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(row, timestep_batches[1])
                sync()
            busy[row.key] = sum(e.device_time for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3

    # Model FLOPs per row (the settings do the same arithmetic as their base row): the eager split reward pass
    # (replays of CUDA graphs are invisible to the counter) and gradient checkpointing off (no recomputation).
    def without_checkpointing(run):
        modules = [unet, controlnet] if args.gradient_checkpointing else []
        modules += [vae] if args.vae_gradient_checkpointing else []
        for module in modules:
            module.disable_gradient_checkpointing()
        try:
            return run()
        finally:
            for module in modules:
                module.enable_gradient_checkpointing()

    # Rows with a windowed term do work that depends on the timesteps: count them over every timed batch (the
    # batches the time is averaged over); the plain step once.
    flops = {}
    for row in rows:
        if row.setting == "default":
            counted = replace(row, split="eager") if row.split == "graph" else row
            batches = timestep_batches[1:] if (row.reward or row.alignment) else timestep_batches[1:2]
            counts = [without_checkpointing(lambda t=t, r=counted: count_flops(lambda: step(r, t))) for t in batches]
            flops[row.key] = sum(counts) / len(counts)
    for row in rows:
        flops.setdefault(row.key, flops[row.key.split("-")[0]])

    per_sample = {}
    if args.memory_per_sample:
        # Memory per sample: the slope between batch b/2 and batch b (fixed costs such as weights, gradients and
        # optimizer state cancel), with and without gradient checkpointing, for the plain and the full step.
        half = timestep_batches[1][: b // 2]
        for checkpointing in (False, True):
            for key in ("a", "e"):
                row = next(r for r in rows if r.key == key)
                measured = []
                for batch_timesteps in (half, timestep_batches[1]):
                    if checkpointing:
                        unet.enable_gradient_checkpointing()
                        controlnet.enable_gradient_checkpointing()
                    else:
                        unet.disable_gradient_checkpointing()
                        controlnet.disable_gradient_checkpointing()
                    sync()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    saved_bytes = step(row, batch_timesteps)
                    sync()
                    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
                    measured.append((len(batch_timesteps), saved_bytes, peak))
                (n0, s0, p0), (n1, s1, p1) = measured
                per_sample[(key, checkpointing)] = (
                    (s1 - s0) / (n1 - n0),
                    None if p0 is None else (p1 - p0) / (n1 - n0),
                )
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            controlnet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
            controlnet.disable_gradient_checkpointing()

    loading_rate, loading_how = loader_throughput(resolution, b, args.data_workers, batches=8, data=args.data)

    timed = torch.stack(timestep_batches[1:])
    in400 = in_window(timed, (0, 400)).float().sum(1).mean().item()
    in200 = in_window(timed, (0, 200)).float().sum(1).mean().item()
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        f"### preset {args.preset}, {resolution} px, batch {b}, {args.precision}"
        + (", ControlNet trained in bf16 (--controlnet-dtype)" if args.controlnet_dtype == "bf16" else "")
        + ", gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'} (VAE {'on' if args.vae_gradient_checkpointing else 'off'}), "
        f"{device_name}",
        "",
        f"{args.steps} timed steps per row after one warm-up; mean in-window samples per batch: "
        f"{in400:.2f} for t<=400, {in200:.2f} for t<=200. Memory: 'saved for backward' = largest total of tensors autograd kept for the backward pass (max over steps); "
        "'peak memory' = peak CUDA memory above the resident models, plus the private pool of the reward's CUDA "
        "graph for the rows that replay it; 'GPU kernel time' = sum of CUDA kernel durations in one profiled step "
        "(timesteps of the first timed step); both CUDA only. The split reward pass runs its own backward at once, "
        "so its tensors are not among those kept for the main backward.",
        "",
        "| row | step | time/step (s) | x plain | extra over plain (s) | samples/s | GFLOP/step | TFLOP/s | MFU "
        "| saved for backward (MiB) | x plain | peak memory (MiB) | x plain | GPU kernel time (ms) | x plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def peak_cells(key: str) -> str:
        if device.type != "cuda":
            return "- | - | - | -"
        return (
            f"{peaks[key] / 2**20:.0f} | {peaks[key] / peaks['a']:.2f} | {busy[key]:.1f} | {busy[key] / busy['a']:.2f}"
        )

    def row_peak(row: Row) -> float | None:
        if args.peak_tflops:
            return args.peak_tflops
        precision = "tf32" if args.precision == "fp32" and row.setting == "tf32" else args.precision
        return peak_tflops(device_name, precision) if device.type == "cuda" else None

    peak_flops = row_peak(rows[0])

    def throughput_cells(key: str) -> str:
        rate = flops[key] / mean[key] / 1e12
        peak = row_peak(next(r for r in rows if r.key == key))
        mfu = f"{rate / peak:.1%}" if peak else "-"
        return f"{b / mean[key]:.2f} | {flops[key] / 1e9:.2f} | {rate:.3f} | {mfu}"

    for row in rows:
        lines.append(
            f"| {row.key} | {row.label} | {mean[row.key]:.3f} | {mean[row.key] / mean['a']:.2f} | "
            f"{mean[row.key] - mean['a']:+.3f} | {throughput_cells(row.key)} | {activations[row.key] / 2**20:.0f} | "
            f"{activations[row.key] / max(activations['a'], 1):.2f} | {peak_cells(row.key)} |"
        )
    extra = {k: mean[k] - mean["a"] for k in mean}
    checks = [("full InnerControl <= 1.5x plain", mean["e"] / mean["a"] <= 1.5, f"{mean['e'] / mean['a']:.3f}x")]
    if "d" in mean:
        ratio = mean["d"] / mean["a"]
        checks.insert(0, ("alignment adds <= 10% to the plain step", ratio <= 1.10, f"{ratio:.3f}x"))
    if {"b200", "c200"} <= mean.keys():
        checks.append(
            (
                "subset reward <= 1/3 of whole-batch reward at t<=200",
                extra["c200"] <= extra["b200"] / 3,
                f"{extra['c200']:.3f} s vs {extra['b200']:.3f} s ({extra['c200'] / max(extra['b200'], 1e-9):.2f})",
            )
        )
    if busy:
        reward_busy = {k: busy[k] - busy["a"] for k in busy}
        checks.append(
            ("GPU kernel time: full <= 1.5x plain", busy["e"] / busy["a"] <= 1.5, f"{busy['e'] / busy['a']:.3f}x")
        )
        if "d" in busy:
            ratio = busy["d"] / busy["a"]
            checks.append(("GPU kernel time: alignment adds <= 10%", ratio <= 1.10, f"{ratio:.3f}x"))
        if {"b200", "c200"} <= busy.keys():
            checks.append(
                (
                    "GPU kernel time: subset reward <= 1/3 of whole-batch at t<=200 (profiled step: "
                    f"{int(in_window(timestep_batches[1], (0, 200)).sum())} of {b} in window)",
                    reward_busy["c200"] <= reward_busy["b200"] / 3,
                    f"{reward_busy['c200']:.1f} ms vs {reward_busy['b200']:.1f} ms",
                )
            )
    lines += [
        "",
        f"Throughput: model FLOPs counted by torch.utils.flop_counter (matmuls, convolutions, attention through the "
        f"math kernel; forward and backward; the split reward pass eager; without the recomputation of gradient "
        f"checkpointing; averaged over the timed batches for rows with a windowed term). MFU = TFLOP/s / the "
        f"device's dense {args.precision} peak (the tf32 row: the TF32 peak) "
        + (f"({peak_flops:g} TFLOP/s)." if peak_flops else "(no peak known for this device: --peak-tflops sets one).")
        + f" Data loading alone (decode, resize, collate at {resolution} px, batch {b}, {loading_how}): "
        f"{loading_rate:.1f} samples/s, {loading_rate / (b / mean['e']):.1f}x what the full step (e) consumes.",
    ]
    if skipped_settings:
        lines.append(
            "Settings not measured here: " + "; ".join(f"{k} ({why})" for k, why in skipped_settings.items()) + "."
        )
    if per_sample:
        lines += [
            "",
            "Memory per sample (slope between batch b/2 and b: weights, gradients and optimizer state cancel):",
            "",
            "| row | gradient checkpointing | saved for backward per sample (MiB) | peak memory per sample (MiB) |",
            "| --- | --- | ---: | ---: |",
        ]
        for (key, checkpointing), (saved_slope, peak_slope) in per_sample.items():
            peak_cell = "-" if peak_slope is None else f"{peak_slope / 2**20:.0f}"
            lines.append(f"| {key} | {'on' if checkpointing else 'off'} | {saved_slope / 2**20:.0f} | {peak_cell} |")
    lines += ["", "| target | met | measured |", "| --- | --- | --- |"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {value} |" for name, ok, value in checks]
    table = "\n".join(lines)
    if device.type == "cuda":
        graph = splits["graph"]
        table += "\n\n" + (
            f"Reward CUDA graphs: chunk sizes {graph.chunk_sizes_captured}, shared private pool "
            f"{graph.graph_pool_bytes / 2**20:.0f} MiB."
            if graph.capture_error is None and not args.no_cuda_graph
            else f"Reward CUDA graph: not used ({graph.capture_error or '--no-cuda-graph'}); rows c, e, c200 ran eagerly."
        )
    print(table)
    if args.output:
        with open(args.output, "a") as f:
            f.write(table + "\n\n")
    for key in filter(None, args.profile.split(",")):
        from torch.profiler import ProfilerActivity, profile

        row = next(r for r in rows if r.key == key)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step(row, timestep_batches[1])
            sync()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"profile of row {key} ({row.label}), t={timestep_batches[1].tolist()}")
        print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
