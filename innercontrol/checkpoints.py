"""Crash-safe training checkpoints: written under a temporary name, renamed when complete, pruned to a limit.

A checkpoint folder `checkpoint-<step>` holds accelerate's state (trainable model, optimizer, LR schedule, RNG of
every process, registered objects such as the EMA), `data_state_<rank>.json` for every process and, written last,
`training_state.json`. Only folders with that last file count, so `latest` is always a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

COMPLETE_MARKER = "training_state.json"
PREFIX = "checkpoint-"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """None for a fresh start; `latest` = newest complete checkpoint (None if there is none); else a folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(
            f"logging.resume={resume}: no complete checkpoint there (it needs {COMPLETE_MARKER}); "
            f"use logging.resume=latest or one of {[str(p) for p in complete_checkpoints(output_dir)][-3:]}"
        )
    return path


def save_checkpoint(accelerator, output_dir, step: int, data_state: dict, extra: dict, total_limit: int) -> Path:
    """Every process calls this; returns the final folder. Nothing is visible as a checkpoint until complete."""
    folder = checkpoint_dir(output_dir)
    final = folder / f"{PREFIX}{step}"
    tmp = folder / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    (tmp / f"data_state_{accelerator.process_index}.json").write_text(json.dumps(data_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(json.dumps(dict(extra, step=step), indent=2))
        if final.exists():  # a checkpoint of the same step from an interrupted earlier run
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[: max(0, len(complete_checkpoints(output_dir)) - total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict]:
    """Restore accelerate's state; returns (training_state, this process's data state)."""
    accelerator.load_state(str(path))
    state = json.loads((path / COMPLETE_MARKER).read_text())
    data_file = path / f"data_state_{accelerator.process_index}.json"
    if not data_file.is_file():
        raise FileNotFoundError(
            f"{data_file} is missing: the checkpoint was written by fewer processes than this run has "
            f"({accelerator.num_processes}); resume with the same number of processes"
        )
    return state, json.loads(data_file.read_text())


def resume(accelerator, output_dir, resume_from: str | None, loader) -> tuple[int, Path | None]:
    """Restore the run from `logging.resume` (None, "latest" or a folder) into accelerate's objects and the data
    loader; returns (step, checkpoint folder), (0, None) for a fresh start."""
    checkpoint = find_checkpoint(output_dir, resume_from)
    if checkpoint is None:
        return 0, None
    state, data_state = load_checkpoint(accelerator, checkpoint)
    loader.load_state_dict(data_state)
    return int(state["step"]), checkpoint


def save_model_atomically(model, folder: str | Path) -> Path:
    """save_pretrained into a temporary folder, then rename over `folder`."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
