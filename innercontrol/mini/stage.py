"""One resumable training stage of the miniature: the loop every part (VAE, CLIP, depth, UNet) shares.

    stage = Stage("vae", work, model, lr=1e-3, max_steps=3000)
    stage.run(lambda step, generator: {"loss": ..., "mse": ...})   # resumes from work/vae/checkpoint.pt
    mark_done(work, "vae", {"psnr_db": ...})                      # work/vae/done.json; done_report reads it

Each step draws its batch and noise from a generator seeded by (seed, step), so a resumed stage takes exactly the
steps an uninterrupted one would. Checkpoints (model, optimizer, schedule, step) are written under a temporary name
and renamed, so an interrupted save never replaces the last good one. Losses go to work/<name>/log.csv.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from innercontrol.report import write_text


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step (batch indices, noise, timesteps)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def warmup_cosine(step: int, warmup: int, max_steps: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `floor` at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Stage:
    """A resumable AdamW loop over `max_steps` steps for `model` (its trainable parameters)."""

    def __init__(
        self,
        name: str,
        work: str | Path,
        model: torch.nn.Module,
        lr: float,
        max_steps: int,
        seed: int = 0,
        weight_decay: float = 0.0,
        warmup: int = 100,
        checkpoint_every: int = 250,
        log_every: int = 25,
        max_grad_norm: float = 1.0,
        progress: bool = True,
    ):
        self.name, self.model, self.max_steps, self.seed = name, model, max_steps, seed
        self.folder = Path(work) / name
        self.checkpoint_every, self.log_every, self.max_grad_norm = checkpoint_every, log_every, max_grad_norm
        self.progress = progress
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, min(warmup, max_steps), max_steps)
        )
        self.step = 0
        self.seconds = 0.0  # training time of this stage over all its runs (resumes included)

    @classmethod
    def from_preset(cls, name: str, work: str | Path, model: torch.nn.Module, preset: dict, seed: int, progress: bool):
        """The stage of a module's preset: lr, max_steps and warmup from it, and weight_decay and checkpoint_every
        where the preset names them (the defaults otherwise)."""
        optional = {key: preset[key] for key in ("weight_decay", "checkpoint_every") if key in preset}
        return cls(
            name, work, model, lr=preset["lr"], max_steps=preset["max_steps"], seed=seed, warmup=preset["warmup"],
            progress=progress, **optional,
        )  # fmt: skip

    @property
    def checkpoint_file(self) -> Path:
        return self.folder / "checkpoint.pt"

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "seconds": self.seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }
        tmp = self.checkpoint_file.with_name("checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_file)

    def load(self) -> bool:
        """Restore the latest checkpoint if there is one; True when restored."""
        if not self.checkpoint_file.is_file():
            return False
        state = torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        return True

    def run(self, step_fn: Callable[[int, torch.Generator], dict[str, torch.Tensor]]) -> torch.nn.Module:
        """Train until max_steps; step_fn(step, generator) returns the step's terms, "loss" among them."""
        from tqdm.auto import tqdm

        self.load()
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "log.csv").open("a", newline="")
        writer = None
        bar = tqdm(total=self.max_steps, initial=self.step, desc=self.name, disable=not self.progress)
        self.model.train()
        try:
            while self.step < self.max_steps:
                start = time.perf_counter()
                terms = step_fn(self.step, step_generator(self.seed, self.step))
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"stage {self.name}: non-finite loss at step {self.step}; the last checkpoint "
                        f"({self.checkpoint_file}) is kept; rerun to resume, perhaps with a lower learning rate"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                self.optimizer.step()
                self.schedule.step()
                self.step += 1
                self.seconds += time.perf_counter() - start
                bar.update(1)
                if self.step % self.log_every == 0 or self.step == self.max_steps:
                    row = {"step": self.step, "seconds": round(self.seconds, 2), "lr": self.schedule.get_last_lr()[0]}
                    row.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()})
                    if writer is None:
                        writer = csv.DictWriter(log, fieldnames=list(row))
                        if log.tell() == 0:
                            writer.writeheader()
                    writer.writerow(row)
                    log.flush()
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if self.step % self.checkpoint_every == 0 or self.step == self.max_steps:
                    self.save()
        finally:
            bar.close()
            log.close()
        self.model.eval()
        return self.model


def done_report(work: str | Path, name: str) -> dict:
    """The report of a finished stage (work/<name>/done.json); {} while the stage is not done."""
    done = Path(work) / name / "done.json"
    return json.loads(done.read_text()) if done.is_file() else {}


def mark_done(work: str | Path, name: str, quality: dict) -> dict:
    """Record stage `name` as done (the orchestrator then skips its evaluation): steps and training time from its
    last checkpoint, and its held-out quality. Returns the report."""
    folder = Path(work) / name
    state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    report = {"stage": name, "steps": int(state["step"]), "train_seconds": round(float(state["seconds"]), 1), **quality}
    write_text(folder / "done.json", json.dumps(report, indent=2))
    return report
