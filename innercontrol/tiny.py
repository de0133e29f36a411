"""Offline tiny Stable-Diffusion-1.5-shaped pipeline, written in the hub layout.

    python -m innercontrol.tiny --out checkpoints/tiny
    python -m innercontrol.tiny --out checkpoints/tiny_sdxl --family sdxl   # SDXL block layout, two text encoders

The folder loads wherever a model name goes (model.pretrained_model=checkpoints/tiny,
model.controlnet=checkpoints/tiny/controlnet) and with StableDiffusionControlNetPipeline.from_pretrained.
The UNet has SD1.5's block layout (4 levels, cross-attention in 3 decoder levels, 2 layers per block),
so the probe taps exist as in SD1.5 (9 attention taps, 12 ResNet taps), with tiny widths.
Also writes clip/ (a tiny CLIPModel for CLIP-score tests), dpt/ (a tiny depth model), t2i_adapter/ (a tiny
T2IAdapter for the T2I-Adapter evaluation) and the marker tiny_random_weights.json, by which
evaluation reports label results of these random weights. Same command, same weights.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

TINY_RESOLUTION = 128  # image pixels; the VAE downsamples by 8 as SD's does
# Written into the pipeline folder: reports (innercontrol.report) mark results made with these random weights.
TINY_MARKER = "tiny_random_weights.json"

UNET_CONFIG = dict(
    sample_size=TINY_RESOLUTION // 8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

# The real SDXL base 1.0 UNet architecture (2.6 B parameters; benchmarks and tap tests with random weights).
SDXL_BASE_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG) text states
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=6 * 256 + 1280,  # six size ids + the pooled OpenCLIP embedding
)

# SDXL's UNet block layout with tiny widths: 3 levels (no attention in the first), deeper transformers further down
# (SDXL: 1 / 2 / 10 layers; here 1 / 1 / 2), linear projections, and the "text_time" added conditioning (pooled text
# embedding of the second text encoder + 6 size / crop numbers, each embedded in addition_time_embed_dim).
SDXL_TEXT_DIM = 32  # hidden size of each tiny text encoder (SDXL: 768 and 1280); the UNet sees both concatenated
SDXL_UNET_CONFIG = dict(
    SDXL_BASE_UNET_CONFIG,
    sample_size=TINY_RESOLUTION // 8,
    block_out_channels=(16, 32, 64),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=2 * SDXL_TEXT_DIM,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + SDXL_TEXT_DIM,  # 6 time ids x 8 + the pooled text embedding
    norm_num_groups=8,
)

# The real SD1.5 UNet architecture (for benchmarks and tap tests with random weights).
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=TINY_RESOLUTION,
)

# SD1.5's scheduler configuration.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def tiny_tokenizer():
    """CLIP tokenizer from the small vocabulary shipped in the package (919 tokens, 77 positions)."""
    from transformers import CLIPTokenizer

    folder = Path(__file__).parent / "assets" / "tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def calibrate_vae(vae):
    """Make a random VAE behave like SD's: a near-deterministic posterior and unit-variance scaled latents.

    A freshly initialised encoder predicts log-variance ~0, so sampled latents would be posterior noise (std 1)
    swamping the image signal (std ~0.2); SD's trained VAE has a tiny posterior std. The scaling factor is set
    from a fixed batch of smooth random images, as SD's 0.18215 was set from data.
    """
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = -12.0  # log-variance: posterior std e^-6
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(16, 3, 8, 8, generator=generator) * 2 - 1
        images = torch.nn.functional.interpolate(coarse, size=vae.config.sample_size, mode="bicubic").clamp(-1, 1)
        std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 4))
    return vae


def _unet_and_controlnet(unet_config: dict, seed: int):
    """A random UNet (seed) and its ControlNet (seed + 1) with small random output convolutions: from_unet
    zero-initialises them, and the tiny ControlNet should affect generation from the start, as a pretrained one does."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.02)
    return unet, controlnet


def build_tiny_pipeline():
    """The tiny StableDiffusionControlNetPipeline, seeded so every build has the same weights."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionControlNetPipeline,
    )
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer()
    unet, controlnet = _unet_and_controlnet(UNET_CONFIG, seed=0)
    torch.manual_seed(2)
    vae = calibrate_vae(AutoencoderKL(**VAE_CONFIG))
    torch.manual_seed(3)
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    return StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_adapter():
    """A tiny T2IAdapter (full_adapter) for the tiny UNet: one feature map per down block, channels matching."""
    from diffusers import T2IAdapter

    torch.manual_seed(6)
    return T2IAdapter(
        in_channels=3,
        channels=list(UNET_CONFIG["block_out_channels"]),
        num_res_blocks=1,
        downscale_factor=8,
        adapter_type="full_adapter",
    )


def build_tiny_sdxl():
    """The tiny StableDiffusionXLControlNetPipeline (two text encoders, the second with a projection for the pooled
    embedding) and a tiny SDXL T2IAdapter (full_adapter_xl: features at 1/16 and 1/32 of the image, as SDXL's down
    blocks 2-3 and mid block see them), seeded so every build has the same weights."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLControlNetPipeline,
        T2IAdapter,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    unet, controlnet = _unet_and_controlnet(SDXL_UNET_CONFIG, seed=10)
    torch.manual_seed(12)
    vae = calibrate_vae(AutoencoderKL(**VAE_CONFIG))
    torch.manual_seed(13)
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    torch.manual_seed(14)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer)))
    pipe = StableDiffusionXLControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        controlnet=controlnet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    torch.manual_seed(15)
    channels = SDXL_UNET_CONFIG["block_out_channels"]
    adapter = T2IAdapter(
        in_channels=3,
        channels=[*channels, channels[-1]],
        num_res_blocks=1,
        downscale_factor=16,
        adapter_type="full_adapter_xl",
    )
    return pipe, adapter


def build_tiny_clip():
    """A tiny CLIPModel (text + vision) with its processor, for CLIP-score tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    tokenizer = tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    config = CLIPConfig(
        text_config=_text_config(len(tokenizer)).to_dict(), vision_config=vision.to_dict(), projection_dim=32
    )
    torch.manual_seed(4)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_dpt():
    """A tiny DPTForDepthEstimation (32 px input) with its DPTImageProcessor, for depth-condition tests."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        # The default 0.02 gives depths of ~1e-9 (mostly clipped by the head's ReLU); 0.1 gives ~0.1 and a gradient.
        initializer_range=0.1,
    )
    torch.manual_seed(5)
    model = DPTForDepthEstimation(config)
    processor = DPTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3, keep_aspect_ratio=False
    )
    return model, processor


def write_tiny(out: str | os.PathLike) -> Path:
    """Write the tiny pipeline to `out` (hub layout), the tiny CLIP to `out/clip`, the tiny depth model to `out/dpt` and
    a tiny T2I-Adapter to `out/t2i_adapter`; returns `out`."""
    out = Path(out)
    build_tiny_pipeline().save_pretrained(out, safe_serialization=True)
    build_tiny_adapter().save_pretrained(out / "t2i_adapter", safe_serialization=True)
    return _write_evaluators(
        out, "innercontrol.tiny: random weights; numbers made with them test the machinery, not SD1.5"
    )


def _write_evaluators(out: Path, note: str) -> Path:
    """The tiny CLIP (out/clip), the tiny depth model (out/dpt) and the random-weights marker with `note`."""
    model, processor = build_tiny_clip()
    model.save_pretrained(out / "clip", safe_serialization=True)
    processor.save_pretrained(out / "clip")
    for part in build_tiny_dpt():
        part.save_pretrained(out / "dpt")
    (out / TINY_MARKER).write_text(json.dumps({"random_weights": True, "note": note}) + "\n")
    return out


def write_tiny_sdxl(out: str | os.PathLike) -> Path:
    """Write the tiny SDXL pipeline to `out` (hub layout, with controlnet/), a tiny SDXL T2I-Adapter to
    `out/t2i_adapter`, and the tiny CLIP and depth models as write_tiny does; returns `out`."""
    out = Path(out)
    pipe, adapter = build_tiny_sdxl()
    pipe.save_pretrained(out, safe_serialization=True)
    adapter.save_pretrained(out / "t2i_adapter", safe_serialization=True)
    return _write_evaluators(
        out, "innercontrol.tiny --family sdxl: random weights; numbers made with them test the machinery, not SDXL"
    )


def is_tiny(model_path) -> bool:
    """True for a folder written by write_tiny (random weights), detected by its marker file."""
    return model_path is not None and (Path(model_path) / TINY_MARKER).is_file()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the tiny pipeline to (created)")
    parser.add_argument(
        "--family", default="sd15", choices=("sd15", "sdxl"), help="SD1.5's block layout (default) or SDXL's"
    )
    args = parser.parse_args(argv)
    out = write_tiny(args.out) if args.family == "sd15" else write_tiny_sdxl(args.out)
    print(f"tiny pipeline written to {out} (use model.pretrained_model={out})")


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    run_cli(main)
