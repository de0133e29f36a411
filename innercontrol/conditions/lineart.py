"""Line art: the line-drawing generator of sk_model.pth (lllyasviel/Annotators; Informative Drawings' model.pth)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from innercontrol.conditions.base import (
    Condition,
    channel_mean,
    checkpoint_file,
    load_checkpoint,
    min_max,
    register_condition,
)

LINEART_REPO = "lllyasviel/Annotators"
LINEART_FILE = "sk_model.pth"


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineDrawingGenerator(nn.Module):
    """RGB in [0,1] -> 1-channel drawing in [0,1], lines dark; two stride-2 convs down, residual blocks, two up."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, num_residual_blocks: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(inplace=True)
        )
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1),
            nn.InstanceNorm2d(256),
            nn.ReLU(inplace=True),
        )
        self.model2 = nn.Sequential(*(ResidualBlock(256) for _ in range(num_residual_blocks)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, out_channels, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


@register_condition("lineart")
class LineArtCondition(Condition):
    """White lines on black: 1 - generator output (the generator draws dark lines on white)."""

    metric = "ms_ssim"

    def __init__(self, model_path: Optional[str] = None, purpose: str = "reward", trust_pickle: bool = False):
        generator = LineDrawingGenerator()
        path = checkpoint_file(model_path, LINEART_REPO, LINEART_FILE, "line-art weights", purpose)
        load_checkpoint(generator, path, LINEART_REPO, LINEART_FILE, trust_pickle=trust_pickle)
        super().__init__(generator)

    def control_map(self, images: torch.Tensor) -> torch.Tensor:
        drawing = self.model(images.to(self._model_dtype())).float()
        if drawing.shape[-2:] != images.shape[-2:]:
            # Sides not divisible by 4 come back rounded up by the two stride-2 stages.
            drawing = F.interpolate(drawing, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return 1.0 - drawing

    # Alignment (DESIGN 3): the probe is trained on the white-line control, so its prediction is compared with the
    # white-line control, neither side inverted. The published code inverts the min-max scaled prediction and
    # compares it with the dark-line drawing (= 1 - control): (1 - p) - (1 - c) = c - p, the same loss.
    def normalize_probe_output(self, pred01: torch.Tensor) -> torch.Tensor:
        return min_max(channel_mean(pred01))

    def normalize_label(self, control: torch.Tensor) -> torch.Tensor:
        return channel_mean(control)
