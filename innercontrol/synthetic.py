"""The offline synthetic depth set: coloured shapes standing on a ground plane, with exact depth maps and captions.

    python -m innercontrol.synthetic --out outputs/demo/synthetic --num 500 --resolution 128
    python -m innercontrol.synthetic --out /tmp/synth --num 64 --resolution 64 --seed 1 --val-fraction 0.25

Each scene is a far wall (striped, checkered, dotted or plain) above a ground plane tiled in perspective,
with 1-3 shapes (circle, square, triangle) standing on the ground. A shape whose foot is lower in the
image is nearer, so it is drawn larger and over the shapes behind it. The depth map is the scene's exact
normalised inverse depth, as in MultiGen-20M's control_depth: near = bright (255), the wall and the
horizon = 0, the ground rises linearly to 1 at the bottom edge, and each shape has the depth of its foot.
Captions name the shapes nearest first: "a red circle in front of a blue square on a striped background".

Written as parquet in the hub layout, DIR/data/{train,validation}-NNNNN-of-NNNNN.parquet, columns
image (PNG, RGB), control_depth (PNG, 8-bit grayscale) and text, so `data.dataset=DIR` loads it with
`data.split=train` or `validation`. The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

# Saturated object colours; the names are words the tiny tokenizer knows (scripts/make_tokenizer_assets.py).
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 35),
    "orange": (240, 135, 25),
    "purple": (135, 55, 175),
    "pink": (240, 125, 175),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("striped", "checkered", "dotted", "plain")
DEPTH_COLUMN = "control_depth"


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A desaturated colour for walls and ground, so the saturated shapes stand out."""
    grey = rng.uniform(70, 190)
    return np.clip(grey + rng.uniform(-35, 35, size=3), 0, 255)


def _wall(kind: str, ys: np.ndarray, xs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    first, second = _muted_colour(rng), _muted_colour(rng)
    period = rng.uniform(0.08, 0.2) * size
    if kind == "striped":
        angle = rng.uniform(0, math.pi)
        pattern = ((xs * math.cos(angle) + ys * math.sin(angle)) / period) % 1.0 < 0.5
    elif kind == "checkered":
        pattern = (np.floor(xs / period) + np.floor(ys / period)) % 2 == 0
    elif kind == "dotted":
        dx, dy = (xs / period) % 1.0 - 0.5, (ys / period) % 1.0 - 0.5
        pattern = dx**2 + dy**2 < 0.09
    else:  # plain: a smooth vertical gradient
        weight = (ys / size)[..., None]
        return first * (1 - weight) + second * weight
    return np.where(pattern[..., None], first, second)


def _ground(disparity: np.ndarray, xs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Ground tiles in perspective: world distance is 1/disparity, so tiles shrink towards the horizon."""
    first, second = _muted_colour(rng), _muted_colour(rng)
    safe = np.maximum(disparity, 1e-3)
    along = np.floor(rng.uniform(1.5, 3.0) / safe)
    across = np.floor(rng.uniform(3.0, 6.0) * (xs / size - 0.5) / safe)
    tiles = np.where(((along + across) % 2 == 0)[..., None], first, second)
    # Tiles smaller than a pixel alias into noise near the horizon; blend them to their mean colour there.
    fade = np.clip((disparity - 0.04) / 0.08, 0, 1)[..., None]
    return tiles * fade + (first + second) / 2 * (1 - fade)


def _shape_mask(shape: str, ys: np.ndarray, xs: np.ndarray, centre_x: float, foot: float, height: float):
    top = foot - height
    if shape == "circle":
        radius = height / 2
        return (xs - centre_x) ** 2 + (ys - (foot - radius)) ** 2 <= radius**2
    inside_rows = (ys >= top) & (ys <= foot)
    if shape == "square":
        return inside_rows & (np.abs(xs - centre_x) <= height / 2)
    return inside_rows & (np.abs(xs - centre_x) <= (ys - top) / 2)  # triangle, apex up


def render_scene(
    index: int, resolution: int, seed: int = 0, supersample: int = 1
) -> tuple[np.ndarray, np.ndarray, str]:
    """Scene `index` of the set with this seed: image (R,R,3) uint8, depth (R,R) float in [0,1] (near = 1), caption.

    supersample=k renders the image at k times the resolution and averages each k x k block (antialiased edges and
    textures, the same scene); the depth map and caption are the exact ones of the 1x rendering.
    """
    if supersample > 1:
        large, _, _ = render_scene(index, resolution * supersample, seed)
        image = large.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
        _, depth, caption = render_scene(index, resolution, seed)
        return np.round(image).astype(np.uint8), depth, caption
    rng = np.random.default_rng([seed, index])
    size = resolution
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    horizon = rng.uniform(0.3, 0.55) * size
    on_ground = ys > horizon
    disparity = np.where(on_ground, (ys - horizon) / (size - horizon), 0.0)
    background = str(rng.choice(BACKGROUNDS))
    image = np.where(on_ground[..., None], _ground(disparity, xs, size, rng), _wall(background, ys, xs, size, rng))
    depth = disparity.copy()

    objects = []
    for _ in range(rng.integers(1, 4)):
        nearness = rng.uniform(0.15, 1.0)  # disparity of the foot; perspective makes height proportional to it
        objects.append(
            dict(
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                nearness=nearness,
                foot=horizon + nearness * (size - horizon),
                height=nearness * rng.uniform(0.35, 0.55) * size,
                centre_x=rng.uniform(0.1, 0.9) * size,
                jitter=rng.integers(-20, 21, size=3),
            )
        )
    objects.sort(key=lambda obj: obj["nearness"])  # painter's order: far first, near shapes occlude them
    masks = []
    for obj in objects:
        mask = _shape_mask(obj["shape"], ys, xs, obj["centre_x"], obj["foot"], obj["height"])
        colour = np.clip(np.array(COLOURS[obj["colour"]]) + obj["jitter"], 0, 255)
        shade = 1.1 - 0.2 * np.clip((ys - (obj["foot"] - obj["height"])) / obj["height"], 0, 1)  # lit from above
        image = np.where(mask[..., None], np.clip(colour * shade[..., None], 0, 255), image)
        depth = np.where(mask, obj["nearness"], depth)
        masks.append(mask)

    # Name the shapes that stay visible (a shape hidden behind a nearer one is not described).
    visible = []
    for i, (obj, mask) in enumerate(zip(objects, masks)):
        covered = np.zeros_like(mask)
        for nearer in masks[i + 1 :]:
            covered |= nearer
        if mask.sum() > 0 and (mask & ~covered).sum() >= 0.3 * mask.sum():
            visible.append(obj)
    if not visible:
        visible = objects[-1:]
    phrases = [
        f"{'an' if obj['colour'][0] in 'aeiou' else 'a'} {obj['colour']} {obj['shape']}" for obj in reversed(visible)
    ]
    caption = " in front of ".join(phrases) + f" on a {background} background"
    return np.round(image).astype(np.uint8), np.clip(depth, 0.0, 1.0), caption


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _features():
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    return Features({"image": ImageFeature(), DEPTH_COLUMN: ImageFeature(), "text": Value("string")})


def write_synthetic(
    out: str | Path,
    num: int,
    resolution: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    rows_per_file: int = 1000,
    progress: bool = False,
    supersample: int = 1,
) -> Path:
    """Write `num` scenes (the last round(num * val_fraction) form the validation split) to `out`; returns `out`.

    supersample: render_scene's antialiasing factor (the miniature was trained on supersample=2 scenes).
    """
    import datasets
    from tqdm.auto import tqdm

    if num < 1 or resolution < 8 or supersample < 1:
        raise ValueError(
            f"need num >= 1, resolution >= 8 and supersample >= 1, got num={num}, resolution={resolution}, "
            f"supersample={supersample}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    num_val = int(round(num * val_fraction))
    if num - num_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training rows out of {num}")
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for old in (out / "data").glob("*.parquet"):
        old.unlink()  # a rewrite with fewer files must not leave stale shards behind
    splits = {"train": range(0, num - num_val), "validation": range(num - num_val, num)}
    bar = tqdm(total=num, desc="synthetic scenes", unit="img", disable=not progress)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar for the whole set, not one per parquet file
    try:
        for split, indices in splits.items():
            num_files = max(1, math.ceil(len(indices) / rows_per_file))
            for file_index in range(num_files):
                rows = {"image": [], DEPTH_COLUMN: [], "text": []}
                for index in indices[file_index * rows_per_file : (file_index + 1) * rows_per_file]:
                    image, depth, caption = render_scene(index, resolution, seed, supersample)
                    rows["image"].append({"bytes": _png(image), "path": None})
                    rows[DEPTH_COLUMN].append({"bytes": _png(np.round(depth * 255).astype(np.uint8)), "path": None})
                    rows["text"].append(caption)
                    bar.update()
                path = out / "data" / f"{split}-{file_index:05d}-of-{num_files:05d}.parquet"
                datasets.Dataset.from_dict(rows, features=_features()).to_parquet(str(path))
    finally:
        bar.close()
        if bars_were_on:
            datasets.enable_progress_bars()
    (out / "README.md").write_text(
        f"Synthetic depth set written by `python -m innercontrol.synthetic` (seed {seed}, {resolution} px, "
        f"supersample {supersample}): "
        f"{num - num_val} train and {num_val} validation rows; columns image, {DEPTH_COLUMN} (near = 255), text.\n"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the dataset to (created; old shards replaced)")
    parser.add_argument("--num", type=int, default=500, help="number of scenes, both splits together (default 500)")
    parser.add_argument("--resolution", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of scenes in validation (default 0.1)")
    parser.add_argument("--rows-per-file", type=int, default=1000, help="rows per parquet shard (default 1000)")
    parser.add_argument(
        "--supersample", type=int, default=1, help="render at k x the resolution and average k x k blocks (default 1)"
    )
    args = parser.parse_args(argv)
    if args.num < 1 or args.resolution < 8 or args.supersample < 1 or not 0.0 <= args.val_fraction < 1.0:
        parser.error("need --num >= 1, --resolution >= 8, --supersample >= 1 and 0 <= --val-fraction < 1")
    out = write_synthetic(
        args.out,
        args.num,
        args.resolution,
        args.seed,
        args.val_fraction,
        args.rows_per_file,
        progress=True,
        supersample=args.supersample,
    )
    print(f"synthetic set written to {out} (use data.dataset={out} with data.split=train or validation)")


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    run_cli(main)
