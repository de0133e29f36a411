"""Control maps for a folder of images or a dataset, computed with a registered condition model.

    python -m innercontrol.annotate --condition hed --input data/images --output data/hed --device cuda
    python -m innercontrol.annotate --condition lineart --input limingcv/MultiGen-20M_canny_eval --split validation \
        --output data/lineart_eval                      # a dataset: hub id, parquet, save_to_disk or imagefolder
    python -m innercontrol.annotate --condition depth --input data/images --output data/depth --model DIR
    python -m innercontrol.annotate --condition canny --input data/images --output data/canny --resolution 64 --device cpu

Every image under --input (png, jpg, jpeg, webp; subfolders kept) becomes OUTPUT/<same relative path>.png: grayscale
when the map's three channels agree (all built-in conditions), RGB otherwise. Outputs that exist are skipped, so an
interrupted run resumes where it stopped; each PNG is written under a temporary name and renamed into place, so a
half-written file is never mistaken for a finished one. Unreadable images are skipped and listed at the end.
OUTPUT/annotate.json records the request (condition, model and its content hash, input, split, resolution): a
different request into the same folder is refused rather than answered with the maps already there.

A dataset (anything data.dataset accepts; --dataset forces this for a folder that also holds images) is read
through innercontrol.data; each row becomes OUTPUT/<row id>.png (the row index, or the image hash when streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from innercontrol.fingerprint import changed_settings
from innercontrol.report import write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REQUEST_FILE = "annotate.json"


@dataclass
class AnnotateResult:
    written: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def find_images(input_dir: Path, exclude: Optional[Path] = None) -> list[Path]:
    """Image files under input_dir, sorted; files under `exclude` (an output folder inside the input) are left out."""
    found = []
    for path in sorted(input_dir.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if exclude is not None and exclude in path.parents:
            continue
        found.append(path)
    return found


def load_image(path: Path, resolution: int) -> Optional[torch.Tensor]:
    """(3,H,W) float in [0,1], resized to resolution x resolution (bicubic, aspect not kept) unless 0; None if unreadable."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if resolution:
                image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return torch.from_numpy(array).permute(2, 0, 1)


def save_map(control: torch.Tensor, path: Path) -> None:
    """Write a (3,H,W) map in [0,1] as an 8-bit PNG, atomically (temporary name, then os.replace)."""
    pixels = (control.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2]):
        image = Image.fromarray(pixels[0].numpy(), mode="L")
    else:
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


@torch.inference_mode()
def annotate_folder(
    condition, input_dir: Path, output_dir: Path, batch_size: int = 8, resolution: int = 512, device: str = "cpu"
) -> AnnotateResult:
    """Compute condition(image) for every image under input_dir that has no output yet."""
    from tqdm import tqdm

    result = AnnotateResult()
    images = find_images(
        input_dir, exclude=output_dir.resolve() if output_dir.resolve() != input_dir.resolve() else None
    )
    targets = {path: output_dir / path.relative_to(input_dir).with_suffix(".png") for path in images}
    clashes = _clashing_outputs(targets)
    if clashes:
        raise ValueError(f"these inputs would write the same output (rename one of each): {'; '.join(clashes)}")
    pending = []
    for path, target in targets.items():
        (result.already_done if target.exists() else pending).append(path)
    result.already_done = [str(p) for p in result.already_done]

    progress = tqdm(total=len(pending), desc=f"{condition.name} maps", unit="img")
    for start in range(0, len(pending), batch_size):
        loaded = []
        for path in pending[start : start + batch_size]:
            pixels = load_image(path, resolution)
            if pixels is None:
                result.unreadable.append(str(path))
            else:
                loaded.append((path, pixels))
        # Batch images of equal size together (all of them when --resolution is set).
        by_size: dict[tuple[int, int], list[tuple[Path, torch.Tensor]]] = {}
        for path, pixels in loaded:
            by_size.setdefault(tuple(pixels.shape[-2:]), []).append((path, pixels))
        for group in by_size.values():
            maps = condition(torch.stack([pixels for _, pixels in group]).to(device))
            for (path, _), control in zip(group, maps):
                save_map(control, targets[path])
                result.written.append(str(targets[path]))
        progress.update(len(pending[start : start + batch_size]))
    progress.close()
    return result


@torch.inference_mode()
def annotate_dataset(condition, data_cfg, output_dir: Path, batch_size: int = 8, device: str = "cpu") -> AnnotateResult:
    """Compute condition(image) for every row of a dataset (one pass, in order) that has no output yet."""
    from tqdm import tqdm

    from innercontrol.data import build_dataloader

    result = AnnotateResult()
    loader = build_dataloader(data_cfg, batch_size, shuffle=False, infinite=False, num_workers=0)
    for batch in tqdm(loader, desc=f"{condition.name} maps", unit="batch"):
        targets = [output_dir / f"{str(row).replace('/', '_').replace(':', '-')}.png" for row in batch["row_id"]]
        todo = [i for i, target in enumerate(targets) if not target.exists()]
        result.already_done += [str(targets[i]) for i in range(len(targets)) if i not in todo]
        if not todo:
            continue
        images = (batch["pixel_values"][todo].to(device) + 1) / 2
        for index, control in zip(todo, condition(images)):
            save_map(control, targets[index])
            result.written.append(str(targets[index]))
    result.unreadable = [str(row) for row in loader.stats.bad_row_ids]
    return result


def _clashing_outputs(targets: dict[Path, Path]) -> list[str]:
    seen: dict[Path, Path] = {}
    clashes = []
    for path, target in targets.items():
        if target in seen:
            clashes.append(f"{seen[target]} and {path} -> {target}")
        seen[target] = path
    return clashes


def request_fingerprint(args, from_folder: bool) -> dict:
    """What decides the maps' pixels: the condition model (by content), the images it reads, their resolution."""
    from innercontrol.fingerprint import content_digest, normalized_path

    local_model = args.model is not None and Path(args.model).expanduser().exists()
    return {
        "condition": args.condition,
        "model": normalized_path(args.model),
        "model_sha256": content_digest(args.model) if local_model else None,
        "purpose": args.purpose if args.model is None else None,  # picks the published default
        "input": normalized_path(args.input),
        "source": "folder" if from_folder else "dataset",
        "split": None if from_folder else args.split,
        "image_column": None if from_folder else args.image_column,
        "resolution": args.resolution,
    }


def claim_output(output_dir: Path, request: dict, inputs: list[Path]) -> Optional[str]:
    """Record `request` in output_dir, or say why its maps cannot go there (None when they can)."""
    record = output_dir / REQUEST_FILE
    if record.is_file():
        found = json.loads(record.read_text())
        changed = changed_settings(found, request, recorded_where="there")
        if changed:
            return (
                f"--output {output_dir} holds maps of another request ({'; '.join(changed)}); pass another --output "
                "or delete the folder"
            )
        return None
    ours = {path.resolve() for path in inputs}
    strays = [p for p in sorted(output_dir.rglob("*.png")) if p.resolve() not in ours] if output_dir.is_dir() else []
    if strays:
        return (
            f"--output {output_dir} holds {len(strays)} PNG file(s) (e.g. {strays[0]}) but no {REQUEST_FILE} saying "
            "what made them; pass another --output or delete them"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps(request, indent=1))
    return None


def cli_hint(message: str) -> str:
    """A condition loader's advice in this command's terms: its config keys are the --model flag here."""
    message = re.sub(r"condition\.(reward|eval)_model=", "--model ", message)
    return re.sub(r" \(in Python: get_condition\(.*?\)\)", "", message)


def main(argv: Optional[list[str]] = None) -> AnnotateResult:
    from innercontrol.conditions import CONDITIONS, get_condition

    parser = argparse.ArgumentParser(
        prog="python -m innercontrol.annotate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # what to compute
    parser.add_argument("--condition", required=True, choices=sorted(CONDITIONS), help="registered condition")
    parser.add_argument("--model", default=None, help="weights: local file/folder or hub id (default: published)")
    parser.add_argument(
        "--purpose", default="reward", choices=("reward", "eval"), help="which published default (depth differs)"
    )
    parser.add_argument("--trust-pickle", action="store_true", help="allow a .pth that needs full unpickling")
    # input and output
    parser.add_argument(
        "--input", required=True, help="folder of images (png, jpg, jpeg, webp; searched recursively) or a dataset"
    )
    parser.add_argument("--dataset", action="store_true", help="read --input as a dataset even if it holds images")
    parser.add_argument("--split", default="train", help="dataset split (dataset input)")
    parser.add_argument("--image-column", default="image", help="dataset image column (dataset input)")
    parser.add_argument("--caption-column", default="text", help="dataset caption column (dataset input)")
    parser.add_argument("--output", required=True, help="folder for the PNG maps (created; existing maps are kept)")
    parser.add_argument("--resolution", type=int, default=512, help="resize images to R x R first; 0 = keep size")
    # how
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    input_dir, output_dir = Path(args.input), Path(args.output)
    if not input_dir.exists() and (args.input.startswith(("/", ".", "~")) or args.input.count("/") != 1):
        parser.error(
            f"--input {args.input} does not exist: pass a folder of images or a dataset (hub id owner/name, "
            "parquet file or folder, save_to_disk folder)"
        )
    from_folder = not args.dataset and input_dir.is_dir() and bool(find_images(input_dir))
    if not from_folder and not args.resolution:
        parser.error("dataset input needs --resolution > 0 (rows are batched at one size)")
    try:
        condition = get_condition(
            args.condition,
            model_path=args.model,
            device=args.device,
            purpose=args.purpose,
            trust_pickle=args.trust_pickle,
        )
    except (OSError, RuntimeError, ValueError) as err:  # missing or unreadable weights, hub out of reach
        sys.exit(f"annotate: {cli_hint(str(err))}")
    # Claimed only once the model loaded, so a failed command does not tie the folder to its request.
    inputs = find_images(input_dir) if from_folder else []
    problem = claim_output(output_dir, request_fingerprint(args, from_folder), inputs)
    if problem:
        parser.error(problem)
    if from_folder:
        result = annotate_folder(condition, input_dir, output_dir, args.batch_size, args.resolution, args.device)
    else:
        from innercontrol.config import DataConfig

        data_cfg = DataConfig(
            dataset=args.input,
            split=args.split,
            image_column=args.image_column,
            caption_column=args.caption_column,
            control_column=None,
            resolution=args.resolution,
            num_workers=0,
        )
        result = annotate_dataset(condition, data_cfg, output_dir, args.batch_size, args.device)
    print(
        f"wrote {len(result.written)} maps to {output_dir}, {len(result.already_done)} already there, "
        f"{len(result.unreadable)} unreadable"
    )
    if result.unreadable:
        print("skipped unreadable images:\n  " + "\n  ".join(result.unreadable), file=sys.stderr)
    return result


if __name__ == "__main__":
    from innercontrol.cli import run_cli

    run_cli(main)
