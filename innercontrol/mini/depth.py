"""The miniature's depth model: a small transformers DPTForDepthEstimation trained on (scene, exact depth) pairs.

    model = train(train_bank, PRESETS["cpu"], work, seed=0)   # resumable stage work/depth
    evaluate(model, held_out_bank, PRESETS["cpu"])            # {"rmse": ..., ...}
    save(model, folder)    # get_condition("depth", model_path=folder) loads it

It predicts relative inverse depth as MiDaS does (near = large, far = 0), so depth control and the ControlNet++
RMSE protocol (prediction / its max vs the min-max scaled label) treat it like DPT-Hybrid. The loss compares the
prediction, resized to the scene, with the exact depth: L1 on the raw values plus the protocol's own squared error.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from innercontrol import metrics
from innercontrol.conditions.base import divide_by_max, min_max
from innercontrol.mini.scenes import SceneBank
from innercontrol.mini.stage import Stage

PRESETS: dict[str, dict] = {
    # Sized by measurement on a 2-core CPU: about 38 minutes of training (see the model card).
    "cpu": dict(
        image_size=64,  # the scene size (DPT's head upsamples 2x at patch 8: 128 px out, resized to the scene)
        patch_size=8,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        neck_hidden_sizes=(32, 64, 128, 128),
        fusion_hidden_size=64,
        batch_size=16,
        lr=5e-4,
        warmup=100,
        checkpoint_every=250,
        # 0.28-0.38 s/step on 2 cores. 2500 steps with protocol_weight 1: held-out RMSE 13.5 (target 10), the
        # training protocol error as high as the held-out one: under-trained, not over-fitted. 6000 steps with
        # protocol_weight 4: held-out RMSE 7.7 in 37.6 minutes.
        max_steps=6000,
        protocol_weight=4.0,  # the RMSE protocol's term against the L1 that anchors the scale
        eval_batch_size=32,
    ),
    # Tests: a few steps on 32 px scenes.
    "smoke": dict(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        neck_hidden_sizes=(8, 16, 32, 32),
        fusion_hidden_size=16,
        batch_size=4,
        lr=1e-3,
        warmup=2,
        checkpoint_every=3,
        max_steps=6,
        protocol_weight=4.0,
        eval_batch_size=8,
    ),
}
MEAN_STD = 0.5  # the processor's image_mean and image_std: pixel values in [-1, 1], as DPT-Hybrid's


def build(preset: dict, seed: int = 0):
    """A freshly initialised DPTForDepthEstimation of the preset's size (same seed, same weights)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        image_size=preset["image_size"],
        patch_size=preset["patch_size"],
        hidden_size=preset["hidden_size"],
        num_hidden_layers=preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"],
        intermediate_size=preset["intermediate_size"],
        backbone_out_indices=list(range(preset["num_hidden_layers"]))[-4:],
        neck_hidden_sizes=list(preset["neck_hidden_sizes"]),
        fusion_hidden_size=preset["fusion_hidden_size"],
    )
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(config)
    # Freshly initialised, the head outputs ~1e-8, half of it clipped by the final ReLU (no gradient there), and a
    # larger initializer_range makes it explode instead. Start it at a mid depth, where every pixel has a gradient.
    with torch.no_grad():
        model.head.head[-2].bias.fill_(0.5)
    return model


def image_processor(size: int):
    """The DPTImageProcessor saved beside the model (innercontrol.conditions.depth reads size, mean/std, resample)."""
    from transformers import DPTImageProcessor

    return DPTImageProcessor(
        size={"height": size, "width": size},
        image_mean=[MEAN_STD] * 3,
        image_std=[MEAN_STD] * 3,
        keep_aspect_ratio=False,
        resample=3,  # bicubic, as DepthCondition resizes
    )


def predict_depth(model, images: torch.Tensor, image_size: int, antialias: bool = False) -> torch.Tensor:
    """Raw relative inverse depth (B,1,H,W) at the scene size of scenes in [-1, 1], as DepthCondition.predict_depth."""
    x = F.interpolate(images, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=antialias)
    depth = model(pixel_values=x).predicted_depth.unsqueeze(1)
    return F.interpolate(depth, size=images.shape[-2:], mode="bilinear", align_corners=False)


def depth_loss(prediction: torch.Tensor, depth: torch.Tensor, protocol_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """L1 to the exact depth plus protocol_weight x the RMSE protocol's squared error (prediction / max vs min-max
    label): the L1 fixes the scale, which the protocol ignores."""
    l1 = (prediction - depth).abs().mean()
    protocol = (divide_by_max(prediction) - min_max(depth)).pow(2).mean()
    return {"loss": l1 + protocol_weight * protocol, "l1": l1.detach(), "protocol_mse": protocol.detach()}


def train(train_bank: SceneBank, preset: dict, work: str | Path, seed: int = 0, progress: bool = True):
    """Train (or resume, or reload when done) the stage work/depth; the model in eval mode."""
    model = build(preset, seed=seed)
    stage = Stage.from_preset("depth", work, model, preset, seed, progress)

    def step(step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        indices = torch.randint(len(train_bank), (preset["batch_size"],), generator=generator)
        images, depth, _ = train_bank.batch(indices)
        # Mirror half the batch: the scenes' geometry is left-right symmetric.
        flip = torch.rand(len(indices), generator=generator) < 0.5
        images[flip], depth[flip] = images[flip].flip(-1), depth[flip].flip(-1)
        return depth_loss(predict_depth(model, images, preset["image_size"]), depth, preset["protocol_weight"])

    stage.run(step)
    return model.eval()


@torch.no_grad()
def evaluate(model, held_out_bank: SceneBank, preset: dict) -> dict:
    """Held-out depth RMSE (0-255 protocol of innercontrol.metrics.depth_rmse, label = the exact depth)."""
    model.eval()
    scores = []
    for start in range(0, len(held_out_bank), preset["eval_batch_size"]):
        images, depth, _ = held_out_bank.batch(range(start, min(start + preset["eval_batch_size"], len(held_out_bank))))
        prediction = predict_depth(model, images, preset["image_size"], antialias=True)  # as purpose="eval"
        scores.append(metrics.depth_rmse(prediction, depth))
    scores = torch.cat(scores)
    return {
        "rmse": round(scores.mean().item(), 3),
        "rmse_p95": round(scores.quantile(0.95).item(), 3),
        "held_out_scenes": len(held_out_bank),
    }


def save(model, folder: str | Path) -> Path:
    """Write the model and its DPTImageProcessor config, the layout get_condition("depth", model_path=...) reads."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor(model.config.image_size).save_pretrained(folder)
    return folder
