"""Offline tiny Stable-Diffusion-1.5-shaped pipeline, written in the hub layout.

    python -m innercontrol.tiny --out checkpoints/tiny

The folder loads wherever a model name goes (model.pretrained_model=checkpoints/tiny,
model.controlnet=checkpoints/tiny/controlnet) and with StableDiffusionControlNetPipeline.from_pretrained.
The UNet has SD1.5's block layout (4 levels, cross-attention in 3 decoder levels, 2 layers per block),
so the probe taps exist as in SD1.5 (9 attention taps, 12 ResNet taps), with tiny widths.
Also writes clip/ (a tiny CLIPModel for CLIP-score tests) and the marker tiny_random_weights.json, by which
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


def build_tiny_pipeline():
    """The tiny StableDiffusionControlNetPipeline, seeded so every build has the same weights."""
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        PNDMScheduler,
        StableDiffusionControlNetPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    # from_unet zero-initialises the output convolutions; give them small random values so the tiny
    # ControlNet has an effect on generation from the start (as a pretrained ControlNet would).
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.02)
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
    """Write the tiny pipeline to `out` (hub layout) and the tiny CLIP to `out/clip`; returns `out`."""
    out = Path(out)
    build_tiny_pipeline().save_pretrained(out, safe_serialization=True)
    model, processor = build_tiny_clip()
    model.save_pretrained(out / "clip", safe_serialization=True)
    processor.save_pretrained(out / "clip")
    for part in build_tiny_dpt():
        part.save_pretrained(out / "dpt")
    note = "innercontrol.tiny: random weights; numbers made with them test the machinery, not SD1.5"
    (out / TINY_MARKER).write_text(json.dumps({"random_weights": True, "note": note}) + "\n")
    return out


def is_tiny(model_path) -> bool:
    """True for a folder written by write_tiny (random weights), detected by its marker file."""
    return model_path is not None and (Path(model_path) / TINY_MARKER).is_file()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the tiny pipeline to (created)")
    args = parser.parse_args(argv)
    out = write_tiny(args.out)
    print(f"tiny pipeline written to {out} (use model.pretrained_model={out})")


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    run_cli(main)
