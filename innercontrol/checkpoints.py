"""Crash-safe training checkpoints: written under a temporary name, renamed when complete, pruned to a limit.

A checkpoint folder `checkpoint-<step>` holds accelerate's state (trainable model, optimizer, LR schedule, RNG of
every process, registered objects such as the EMA), `data_state_<rank>.json` for every process and, written last,
`training_state.json`. Only folders with that last file count, so `latest` is always a complete checkpoint.
training_state.json also records which job made the checkpoint ("train" or "train_probes") and which run (an id
made at a fresh start and kept across resumes): a job never resumes from another job's checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

COMPLETE_MARKER = "training_state.json"
PREFIX = "checkpoint-"
# The key naming each job's output folder (checkpoints, config.yaml).
OUTPUT_KEYS = {"train": "logging.output_dir", "train_probes": "probe.output_dir"}
logger = logging.getLogger("innercontrol.checkpoints")


class OutputFolderError(ValueError):
    """A fresh run would overwrite another run's outputs, or a resume would load another job's checkpoint."""


@dataclass
class Run:
    """Which job and run this process continues: its id, and the step and checkpoint it starts from."""

    job: str
    run_id: str
    step: int = 0
    checkpoint: Path | None = None


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


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


def save_checkpoint(
    accelerator, output_dir, run: Run, step: int, data_state: dict, extra: dict, total_limit: int
) -> Path:
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
        state = dict(extra, job=run.job, run_id=run.run_id, step=step)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(state, indent=2))
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


def checkpoint_job(state: dict) -> str:
    """The job that wrote a checkpoint's training_state.json."""
    # Checkpoints from before the job was recorded: only train's carried a "reason".
    return state.get("job") or ("train" if "reason" in state else "train_probes")


def resume(
    accelerator, job: str, output_dir, resume_from: str | None, loader, optimizer=None, lr_scheduler=None
) -> Run:
    """Restore the run from `logging.resume` (None, "latest" or a folder) into accelerate's objects and the data
    loader. A fresh start gets a new run id; a checkpoint of the other job is refused before anything loads. Given the
    optimizer (and its schedule), the lr and settings it was built with are kept over the checkpoint's
    (apply_optimizer_config), each change logged."""
    checkpoint = find_checkpoint(output_dir, resume_from)
    if checkpoint is None:
        return Run(job, new_run_id())
    recorded = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    written_by = checkpoint_job(recorded)
    if written_by != job:
        raise OutputFolderError(
            f"{checkpoint} is a checkpoint of {written_by}, not of {job}: {job} cannot resume from it. The two "
            f"jobs keep their outputs apart (train: logging.output_dir, train_probes: probe.output_dir): point "
            f"{OUTPUT_KEYS[job]} at a folder of its own instead of {output_dir}, or resume that run with "
            f"python -m innercontrol.{written_by}"
        )
    wanted = optimizer_settings(optimizer, lr_scheduler) if optimizer is not None else None
    state, data_state = load_checkpoint(accelerator, checkpoint)
    loader.load_state_dict(data_state)
    if wanted is not None:
        changes = apply_optimizer_config(optimizer, wanted, lr_scheduler)
        if changes:
            logger.info("this config's optimizer settings replace the checkpoint's: %s", "; ".join(changes))
    return Run(job, state.get("run_id") or new_run_id(), int(state["step"]), checkpoint)


# The per-group optimizer settings a resume takes from this run's config rather than from the checkpoint.
SETTINGS = ("betas", "eps", "weight_decay")


def optimizer_settings(optimizer, lr_scheduler=None) -> list[dict]:
    """Each group's base lr and SETTINGS as this run built the optimizer (from its config), before a checkpoint
    loads over them."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds the torch scheduler
    return [
        {"lr": group["initial_lr"] if scheduler is not None else group["lr"]}
        | {key: group[key] for key in SETTINGS if key in group}
        for group in optimizer.param_groups
    ]


def apply_optimizer_config(optimizer, wanted: list[dict], lr_scheduler=None) -> list[str]:
    """After a resume. Loading a checkpoint puts back every optimizer group's lr and settings (betas, eps, weight
    decay) and the schedule's base lrs as they were saved, which would silently override this run's config: a resume
    with a lower lr would train on at the old one. Set them to `wanted` (optimizer_settings before the load: one dict
    per group, "lr" the base lr) and return what changed, for the log. With a schedule the group's lr becomes base lr
    x this run's schedule factor at the resumed step (a changed warm-up or horizon applies from that step), the
    factor the next step would give."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    changes = []
    for index, (group, settings) in enumerate(zip(optimizer.param_groups, wanted)):
        base = settings["lr"]
        saved = scheduler.base_lrs[index] if scheduler is not None else group["lr"]
        if saved != base:
            changes.append(f"group {index} base lr {saved:g} -> {base:g}")
        if scheduler is None:
            group["lr"] = base
        else:
            scheduler.base_lrs[index] = group["initial_lr"] = base
            if hasattr(scheduler, "lr_lambdas"):  # every schedule of diffusers' get_scheduler is a LambdaLR
                group["lr"] = base * scheduler.lr_lambdas[index](scheduler.last_epoch)
            else:
                group["lr"] = group["lr"] * base / saved
        for key, value in settings.items():
            if key == "lr":
                continue
            current = tuple(group[key]) if isinstance(value, tuple) else group[key]
            if current != value:
                changes.append(f"group {index} {key} {current} -> {value}")
                group[key] = value
    if scheduler is not None:
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes


# Keys that say how this invocation starts (continue or start over), not what the run trains with.
INVOCATION_KEYS = frozenset({"logging.resume", "logging.overwrite"})
# Where a resume keeps the config each earlier stretch of the run trained with (config.yaml holds the latest).
CONFIG_HISTORY = "config_history"


def flat_config(tree, prefix: str = "") -> dict:
    """{"optim.lr": 1e-05, ...} from a nested dict (lists stay values)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(before: dict, after: dict) -> list[str]:
    """`key: old -> new` for every key whose value differs between two nested configs, INVOCATION_KEYS left out."""
    old, new = flat_config(before), flat_config(after)
    absent = "(absent)"
    return [
        f"{key}: {old.get(key, absent)} -> {new.get(key, absent)}"
        for key in sorted(old.keys() | new.keys())
        if key not in INVOCATION_KEYS and (key in old, old.get(key)) != (key in new, new.get(key))
    ]


def unused_path(folder: Path, stem: str, suffix: str = "") -> Path:
    """folder/<stem><suffix>, or the first of <stem>-1<suffix>, <stem>-2<suffix>, ... that does not exist."""
    path, repeat = folder / f"{stem}{suffix}", 1
    while path.exists():
        path, repeat = folder / f"{stem}-{repeat}{suffix}", repeat + 1
    return path


def earlier_histories(output_dir: str | Path) -> list[Path]:
    """The earlier runs' config histories that record_config set aside in output_dir (config_history-earlier-run*):
    run outputs that logging.overwrite=true removes with the rest."""
    return sorted(Path(output_dir).glob(f"{CONFIG_HISTORY}-earlier-run*"))


def record_config(output_dir: str | Path, cfg, step: int, resumed: bool) -> list[str]:
    """Write the run's config to output_dir/config.yaml (main process). On a resume the run's previous config.yaml
    is first compared with this one, key by key: each change is logged, and the previous file is kept as
    config_history/config-until-step-<step>.yaml (-1, -2, ... when the run was resumed at that step before), so every
    config the run trained with stays on disk beside the checkpoints; a fresh start moves an earlier run's
    config_history to config_history-earlier-run(-<n>). Returns the changes."""
    from omegaconf import OmegaConf

    from innercontrol.report import write_text

    output_dir = Path(output_dir)
    path, history = output_dir / "config.yaml", output_dir / CONFIG_HISTORY
    changes = []
    if resumed and path.is_file():
        before = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        changes = config_changes(before, OmegaConf.to_container(cfg, resolve=True))
        if changes:
            history.mkdir(exist_ok=True)
            # -1, -2, ...: resumed at this step before (a crash before the next checkpoint)
            kept = unused_path(history, f"config-until-step-{step}", ".yaml")
            shutil.copyfile(path, kept)
            logger.warning(
                "resumed at step %d with %d config change(s) from the run's config.yaml (kept as %s): %s",
                step,
                len(changes),
                kept,
                "; ".join(changes),
            )
    if not resumed and history.is_dir():
        # A fresh start (e.g. logging.resume=latest with no checkpoint): the earlier run's configs would be read as
        # this run's history. They are set aside, not deleted (that run's final model may still be in the folder).
        aside = unused_path(output_dir, f"{CONFIG_HISTORY}-earlier-run")
        history.rename(aside)
        logger.warning("fresh start: the earlier run's config history moved to %s", aside)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(path, OmegaConf.to_yaml(cfg))  # atomically
    return changes


def prepare_fresh_start(accelerator, outputs: list[Path], resume_from: str | None, overwrite: bool, hint: str):
    """A fresh run (logging.resume=null) whose `outputs` already hold another run's files stops before writing
    anything, naming them; logging.overwrite=true removes them first (the main process, once every process has
    looked). `hint` says how to choose another folder."""
    if resume_from is not None:
        if overwrite:
            raise OutputFolderError(
                f"logging.overwrite=true starts over and logging.resume={resume_from} continues a run: pass only one"
            )
        return
    found = [path for path in outputs if path.is_file() or path.is_dir() and any(path.iterdir())]
    if found and not overwrite:
        raise OutputFolderError(
            f"another run's outputs are already there: {', '.join(_describe(path) for path in found)}. Nothing was "
            f"changed. To continue that run pass logging.resume=latest; to keep it, {hint}; to discard it and start "
            f"over here, logging.overwrite=true"
        )
    accelerator.wait_for_everyone()
    if found and accelerator.is_main_process:
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        logger.warning("logging.overwrite=true: removed the previous run's %s", ", ".join(map(str, found)))
    accelerator.wait_for_everyone()


def _describe(path: Path) -> str:
    if path.name == checkpoint_dir("").name and path.is_dir():
        names = sorted((p.name for p in path.iterdir()), key=lambda name: (len(name), name))
        return f"{path}/ ({', '.join(names)})"
    return f"{path}/" if path.is_dir() else str(path)


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
