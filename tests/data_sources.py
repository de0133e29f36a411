"""Small datasets for the data tests: the same rows written as parquet, imagefolder and save_to_disk."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_rows(num: int, size: tuple[int, int] = (40, 48)) -> list[dict]:
    """Rows with PNG bytes in every image mode the front end converts (RGB, RGBA, L, P) and grayscale controls."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(num):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        mode = ("RGB", "RGBA", "L", "P")[i % 4]
        if mode == "RGBA":
            alpha = np.full(pixels.shape[:2] + (1,), 255, np.uint8)
            alpha[:4] = 0  # transparent top rows must come out white
            image = Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA")
        elif mode == "L":
            image = Image.fromarray(pixels[..., 0], "L")
        elif mode == "P":
            image = Image.fromarray(pixels).quantize(16)
        else:
            image = Image.fromarray(pixels)
        control = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8), "L")
        rows.append({"image": png(image), "control_depth": png(control), "text": f"caption {i}"})
    return rows


def _features():
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    return Features({"image": ImageFeature(), "control_depth": ImageFeature(), "text": Value("string")})


def as_dataset(rows: list[dict]):
    from datasets import Dataset

    columns = {
        "image": [{"bytes": r["image"], "path": None} for r in rows],
        "control_depth": [{"bytes": r["control_depth"], "path": None} for r in rows],
        "text": [r["text"] for r in rows],
    }
    return Dataset.from_dict(columns, features=_features())


def write_parquet_folder(root: Path, splits: dict[str, list[dict]], files_per_split: int = 2) -> Path:
    """Hub layout: root/data/{split}-NNNNN-of-NNNNN.parquet, consecutive rows per file."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        bounds = np.linspace(0, len(rows), files_per_split + 1).astype(int)
        for k in range(files_per_split):
            part = as_dataset(rows[bounds[k] : bounds[k + 1]])
            part.to_parquet(str(root / "data" / f"{split}-{k:05d}-of-{files_per_split:05d}.parquet"))
    return root


def write_imagefolder(root: Path, splits: dict[str, list[dict]]) -> Path:
    """root/{split}/NNN.png + depth/NNN.png + metadata.jsonl with file_name, control_depth_file_name, text."""
    for split, rows in splits.items():
        folder = root / split
        (folder / "depth").mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as metadata:
            for i, row in enumerate(rows):
                (folder / f"{i:03d}.png").write_bytes(row["image"])
                (folder / "depth" / f"{i:03d}.png").write_bytes(row["control_depth"])
                entry = {
                    "file_name": f"{i:03d}.png",
                    "control_depth_file_name": f"depth/{i:03d}.png",
                    "text": row["text"],
                }
                metadata.write(json.dumps(entry) + "\n")
    return root


def write_save_to_disk(root: Path, splits: dict[str, list[dict]]) -> Path:
    from datasets import DatasetDict

    DatasetDict({split: as_dataset(rows) for split, rows in splits.items()}).save_to_disk(str(root))
    return root


def read_rows(folder: Path, split: str) -> list[dict]:
    """The rows of a parquet folder (e.g. the synthetic set) as PNG bytes, in file order."""
    import pyarrow.parquet as pq

    rows = []
    for path in sorted((folder / "data").glob(f"{split}-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows.append(
                {"image": row["image"]["bytes"], "control_depth": row["control_depth"]["bytes"], "text": row["text"]}
            )
    return rows
