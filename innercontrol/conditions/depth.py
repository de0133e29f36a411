"""Depth: transformers DPTForDepthEstimation (MiDaS relative inverse depth: near = large = bright, as control_depth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from innercontrol.conditions.base import Condition, channel_mean, divide_by_max, min_max, register_condition
from innercontrol.hub import HubUnreachableError, resolve_model

# DESIGN 3/4: the anchors reward with DPT-Hybrid MiDaS and evaluate with DPT-Large.
DEFAULT_MODELS = {"reward": "Intel/dpt-hybrid-midas", "eval": "Intel/dpt-large"}
DEFAULT_INPUT_SIZE = (384, 384)
DEFAULT_MEAN_STD = (0.5, 0.5)
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}
# condition.depth_reward_normalization: "max" reproduces ControlNet++'s reward, "min_max" is ours (config.py says why).
REWARD_NORMALIZATIONS = ("max", "min_max")  # PIL codes in the image processor config


def read_preprocessing(folder: str | Path) -> dict:
    """Input size, mean/std and resize mode from the folder's preprocessor_config.json (DPT-Hybrid values if absent)."""
    config_file = Path(folder) / "preprocessor_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    size = config.get("size", DEFAULT_INPUT_SIZE)
    if isinstance(size, int):
        size = (size, size)
    elif isinstance(size, dict):
        if "height" in size:
            size = (size["height"], size["width"])
        else:
            size = (size["shortest_edge"],) * 2
    mean, std = (config.get(k, [v] * 3) for k, v in zip(("image_mean", "image_std"), DEFAULT_MEAN_STD))
    if not config.get("do_normalize", True):
        mean, std = [0.0] * 3, [1.0] * 3
    return {
        "size": tuple(int(s) for s in size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "mode": RESAMPLE_MODES.get(config.get("resample", 3), "bicubic"),
    }


@register_condition("depth")
class DepthCondition(Condition):
    """Relative inverse depth, min-max normalised per sample like MultiGen's control_depth (near = 1, far = 0)."""

    metric = "rmse"

    def __init__(
        self,
        model_path: Optional[str] = None,
        purpose: str = "reward",
        trust_pickle: bool = False,
        reward_normalization: str = "max",
    ):
        from transformers import DPTForDepthEstimation

        name = model_path if model_path is not None else DEFAULT_MODELS[purpose]
        config_key = f"condition.{purpose}_model"
        try:
            folder = resolve_model(str(name), what="depth model", config_key=config_key)
        except HubUnreachableError as err:
            raise HubUnreachableError(f"{err} (in Python: get_condition('depth', model_path=DIR))") from None
        try:
            model = DPTForDepthEstimation.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise OSError(
                f"cannot load a DPTForDepthEstimation from '{folder}' ({str(err).splitlines()[0]}); expected a folder "
                f"written by save_pretrained, e.g. `hf download {DEFAULT_MODELS[purpose]} --local-dir DIR`, then "
                f"{config_key}=DIR"
            ) from None
        super().__init__(model)
        if reward_normalization not in REWARD_NORMALIZATIONS:
            raise ValueError(
                f"condition.depth_reward_normalization={reward_normalization!r} is not one of "
                f"{', '.join(REWARD_NORMALIZATIONS)}"
            )
        self.reward_normalization = reward_normalization
        # Evaluation resizes like DPTImageProcessor (antialiased, as PIL); the reward keeps a plain resize, whose
        # backward exists for every mode and device.
        self.antialias = purpose == "eval"
        pre = read_preprocessing(folder)
        self.input_size, self.resize_mode = pre["size"], pre["mode"]
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, 3, 1, 1), persistent=False)

    def predict_depth(self, images: torch.Tensor) -> torch.Tensor:
        """Raw predicted relative inverse depth (B,1,H,W) at the image size, before any normalisation."""
        # Resized and normalised in torch (not the image processor) so gradients reach the images.
        x = F.interpolate(
            images.float(), size=self.input_size, mode=self.resize_mode, align_corners=False, antialias=self.antialias
        )
        x = ((x - self.mean) / self.std).to(self._model_dtype())
        depth = self.model(pixel_values=x).predicted_depth.unsqueeze(1).float()
        return F.interpolate(depth, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def control_map(self, images: torch.Tensor) -> torch.Tensor:
        # Min-max rather than divide-by-max: the MiDaS annotator that made control_depth subtracts the minimum first.
        return min_max(self.predict_depth(images))

    def normalize_probe_output(self, pred01: torch.Tensor) -> torch.Tensor:
        return divide_by_max(channel_mean(pred01))

    def normalize_label(self, control: torch.Tensor) -> torch.Tensor:
        return divide_by_max(channel_mean(control))

    def reward_prediction(self, images: torch.Tensor) -> torch.Tensor:
        if self.reward_normalization == "max":  # ControlNet++: the prediction divided by its per-sample max
            return divide_by_max(self.predict_depth(images))
        return self(images)  # min_max: the control map, min-max scaled like control_depth

    def reward_label(self, control: torch.Tensor) -> torch.Tensor:
        if self.reward_normalization == "max":  # ControlNet++: channel mean of the control divided by its max
            return divide_by_max(channel_mean(control))
        return super().reward_label(control)
