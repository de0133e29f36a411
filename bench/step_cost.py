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
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass

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
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import DPTConfig, DPTForDepthEstimation

    from innercontrol import tiny
    from innercontrol.conditions import get_condition

    torch.manual_seed(0)
    if preset == "tiny":
        pipe = tiny.build_tiny_pipeline()
        unet, vae, controlnet = pipe.unet, pipe.vae, pipe.controlnet
        text_dim, projection_dim = tiny.UNET_CONFIG["cross_attention_dim"], 32
        depth, processor = tiny.build_tiny_dpt()
    else:
        unet = UNet2DConditionModel(**tiny.SD15_UNET_CONFIG)
        vae = AutoencoderKL(**tiny.SD15_VAE_CONFIG)
        controlnet = ControlNetModel.from_unet(unet)
        text_dim, projection_dim = 768, 384
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
    return unet, vae, controlnet, condition, scheduler, text_dim, projection_dim


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="image size (tiny: 128, sd15: 512 on GPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
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
    args = parser.parse_args(argv)

    from innercontrol.controlled_unet import ControlledUNet, tapped_channels
    from innercontrol.losses import alignment_loss, diffusion_loss, diffusion_target, in_window, reward_loss
    from innercontrol.probes import build_probe
    from innercontrol.reward import SplitReward, host_to_device

    device = torch.device(args.device)
    rows = [row for row in ROWS if device.type == "cuda" or not row.cuda_only]
    resolution = args.resolution or (128 if args.preset == "tiny" else 512)
    weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    workdir = tempfile.mkdtemp(prefix="step_cost_")
    unet, vae, controlnet, condition, scheduler, text_dim, projection_dim = build_models(args.preset, device, workdir)
    for frozen in (unet, vae):
        frozen.requires_grad_(False).to(device, weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    if args.vae_gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    controlnet.to(device).train()
    condition.to(device)
    if condition.model is not None:
        condition.model.to(weight_dtype)
    model = ControlledUNet(unet, controlnet, tap="attn")
    probe = build_probe(tapped_channels(unet, "attn"), projection_dim, unet.config.block_out_channels[0] * 4)
    probe.requires_grad_(False).to(device, weight_dtype).eval()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=args.precision != "fp32")

    generator = torch.Generator().manual_seed(args.seed)
    b, latent = args.batch_size, resolution // 8
    timestep_batches = [torch.randint(0, 1000, (b,), generator=generator) for _ in range(args.steps + 1)]
    images = torch.rand(b, 3, resolution, resolution, generator=generator).to(device) * 2 - 1
    controls = torch.rand(b, 3, resolution, resolution, generator=generator).to(device)
    text = torch.randn(b, 77, text_dim, generator=generator).to(device, weight_dtype)
    noise = torch.randn(b, 4, latent, latent, generator=generator).to(device)

    splits = {
        "graph": SplitReward(vae, condition, cuda_graph=not args.no_cuda_graph, max_chunk=args.max_chunk),
        "eager": SplitReward(vae, condition, cuda_graph=False),
        None: None,
    }

    # Capture the reward graphs before timing (training captures each chunk size the first time it is needed).
    splits["graph"].capture_all(torch.randn(b, 4, latent, latent, device=device), controls)

    def step(row: Row, host_timesteps: torch.Tensor) -> int:
        timesteps = host_to_device(host_timesteps, device)
        with torch.no_grad():
            latents = vae.encode(images.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noisy = scheduler.add_noise(latents.float(), noise, timesteps.cpu()).to(weight_dtype)
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
        f"### preset {args.preset}, {resolution} px, batch {b}, {args.precision}, gradient checkpointing "
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
        "| row | step | time/step (s) | x plain | extra over plain (s) | saved for backward (MiB) | x plain "
        "| peak memory (MiB) | x plain | GPU kernel time (ms) | x plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def peak_cells(key: str) -> str:
        if device.type != "cuda":
            return "- | - | - | -"
        return (
            f"{peaks[key] / 2**20:.0f} | {peaks[key] / peaks['a']:.2f} | {busy[key]:.1f} | {busy[key] / busy['a']:.2f}"
        )

    for row in rows:
        lines.append(
            f"| {row.key} | {row.label} | {mean[row.key]:.3f} | {mean[row.key] / mean['a']:.2f} | "
            f"{mean[row.key] - mean['a']:+.3f} | {activations[row.key] / 2**20:.0f} | "
            f"{activations[row.key] / max(activations['a'], 1):.2f} | {peak_cells(row.key)} |"
        )
    extra = {k: mean[k] - mean["a"] for k in mean}
    checks = [
        ("alignment adds <= 10% to the plain step", mean["d"] / mean["a"] <= 1.10, f"{mean['d'] / mean['a']:.3f}x"),
        ("full InnerControl <= 1.5x plain", mean["e"] / mean["a"] <= 1.5, f"{mean['e'] / mean['a']:.3f}x"),
        (
            "subset reward <= 1/3 of whole-batch reward at t<=200",
            extra["c200"] <= extra["b200"] / 3,
            f"{extra['c200']:.3f} s vs {extra['b200']:.3f} s ({extra['c200'] / max(extra['b200'], 1e-9):.2f})",
        ),
    ]
    if busy:
        reward_busy = {k: busy[k] - busy["a"] for k in busy}
        checks += [
            ("GPU kernel time: alignment adds <= 10%", busy["d"] / busy["a"] <= 1.10, f"{busy['d'] / busy['a']:.3f}x"),
            ("GPU kernel time: full <= 1.5x plain", busy["e"] / busy["a"] <= 1.5, f"{busy['e'] / busy['a']:.3f}x"),
            (
                "GPU kernel time: subset reward <= 1/3 of whole-batch at t<=200 (profiled step: "
                f"{int(in_window(timestep_batches[1], (0, 200)).sum())} of {b} in window)",
                reward_busy["c200"] <= reward_busy["b200"] / 3,
                f"{reward_busy['c200']:.1f} ms vs {reward_busy['b200']:.1f} ms",
            ),
        ]
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
