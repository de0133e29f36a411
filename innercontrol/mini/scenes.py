"""The scene bank of the miniature: synthetic scenes rendered once, cached as one .npz, served as tensors.

bank = SceneBank.load_or_render(work / "scenes_train.npz", num=8000, resolution=128, seed=0)
images, depth, captions = bank.batch(indices)     # uint8 -> float in [-1, 1], depth in [0, 1] (near = 1), list
Train and held-out banks use different seeds, so no held-out scene is ever seen in training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from innercontrol.synthetic import render_scene

HELD_OUT_SEED_OFFSET = 1_000_003  # held-out scenes: seed + this offset (a disjoint random stream)


@dataclass
class SceneBank:
    images: torch.Tensor  # (N, 3, R, R) uint8
    depth: torch.Tensor  # (N, 1, R, R) uint8, near = 255
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def render(cls, num: int, resolution: int, seed: int, progress: bool = True, supersample: int = 1) -> SceneBank:
        from tqdm.auto import tqdm

        images = np.empty((num, resolution, resolution, 3), dtype=np.uint8)
        depth = np.empty((num, resolution, resolution), dtype=np.uint8)
        captions = []
        for index in tqdm(range(num), desc=f"render scenes (seed {seed})", unit="img", disable=not progress):
            image, scene_depth, caption = render_scene(index, resolution, seed, supersample)
            images[index], depth[index] = image, np.round(scene_depth * 255).astype(np.uint8)
            captions.append(caption)
        return cls(
            torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(depth)[:, None], captions
        )

    @classmethod
    def load_or_render(cls, path: str | Path, num: int, resolution: int, seed: int, supersample: int = 1) -> SceneBank:
        """The cached bank at `path` if it was made with these settings, else rendered and cached (atomically)."""
        path = Path(path)
        settings = {"num": num, "resolution": resolution, "seed": seed}
        if supersample > 1:  # (absent for 1, so banks cached before the option stay valid)
            settings["supersample"] = supersample
        if path.is_file():
            with np.load(path) as cached:
                if json.loads(str(cached["settings"])) == settings:
                    return cls(
                        torch.from_numpy(cached["images"]),
                        torch.from_numpy(cached["depth"]),
                        json.loads(str(cached["captions"])),
                    )
        bank = cls.render(num, resolution, seed, supersample=supersample)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            images=bank.images.numpy(),
            depth=bank.depth.numpy(),
            captions=json.dumps(bank.captions),
            settings=json.dumps(settings),
        )
        os.replace(tmp, path)
        return bank

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Images in [-1, 1] (B,3,R,R), depth in [0, 1] (B,1,R,R), captions."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index].float() / 127.5 - 1.0
        depth = self.depth[index].float() / 255.0
        return images, depth, [self.captions[i] for i in index.tolist()]


def banks(
    work: str | Path, num_train: int, num_held_out: int, resolution: int, seed: int, supersample: int = 1
) -> tuple[SceneBank, SceneBank]:
    """(train, held-out) banks cached under `work`; supersample: see synthetic.render_scene (antialiased images)."""
    work = Path(work)
    train = SceneBank.load_or_render(work / f"scenes_train_{resolution}.npz", num_train, resolution, seed, supersample)
    held_out = SceneBank.load_or_render(
        work / f"scenes_held_out_{resolution}.npz", num_held_out, resolution, seed + HELD_OUT_SEED_OFFSET, supersample
    )
    return train, held_out
