"""HED soft edges: the network of ControlNetHED.pth (lllyasviel/Annotators), differentiable end to end."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from innercontrol.conditions.base import Condition, checkpoint_file, load_checkpoint, register_condition

HED_REPO = "lllyasviel/Annotators"
HED_FILE = "ControlNetHED.pth"


class HEDBlock(nn.Module):
    """Optional 2x2 max-pool, `num_convs` 3x3 conv + ReLU, and a 1x1 `projection` to the block's side output."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1) for i in range(num_convs)
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.downsample:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNetwork(nn.Module):
    """RGB in [0,255] -> 5 side outputs at 1, 1/2, 1/4, 1/8, 1/16 of the input size (logits)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))  # learned per-channel mean, subtracted from the input
        self.block1 = HEDBlock(3, 64, num_convs=2, downsample=False)
        self.block2 = HEDBlock(64, 128, num_convs=2, downsample=True)
        self.block3 = HEDBlock(128, 256, num_convs=3, downsample=True)
        self.block4 = HEDBlock(256, 512, num_convs=3, downsample=True)
        self.block5 = HEDBlock(512, 512, num_convs=3, downsample=True)

    def forward(self, rgb255: torch.Tensor) -> list[torch.Tensor]:
        x = rgb255 - self.norm
        side_outputs = []
        for block in (self.block1, self.block2, self.block3, self.block4, self.block5):
            x, side = block(x)
            side_outputs.append(side)
        return side_outputs


@register_condition("hed")
class HEDCondition(Condition):
    """Soft edges, white on black: sigmoid of the mean of the five side outputs upsampled to the input size."""

    metric = "ms_ssim"

    def __init__(self, model_path: Optional[str] = None, purpose: str = "reward", trust_pickle: bool = False):
        network = HEDNetwork()
        path = checkpoint_file(model_path, HED_REPO, HED_FILE, "HED weights", purpose)
        load_checkpoint(network, path, HED_REPO, HED_FILE, trust_pickle=trust_pickle)
        super().__init__(network)

    def control_map(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        side_outputs = self.model(images.to(self._model_dtype()) * 255.0)
        upsampled = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in side_outputs]
        return torch.sigmoid(torch.stack(upsampled).float().mean(dim=0))
