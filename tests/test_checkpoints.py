"""Checkpoint bookkeeping: the job and run each checkpoint records, and the guard of a fresh start."""

import json

import pytest
import torch

from innercontrol.checkpoints import (
    OutputFolderError,
    apply_optimizer_config,
    complete_checkpoints,
    optimizer_settings,
    prepare_fresh_start,
    record_config,
    resume,
    save_checkpoint,
)


class Loader:
    """Stands in for the data loader: only its resumable position matters here."""

    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    accelerator.prepare(torch.nn.Linear(2, 2))
    return accelerator


def state_of(checkpoint):
    return json.loads((checkpoint / "training_state.json").read_text())


def test_checkpoints_record_job_and_run_and_a_resume_keeps_the_run(accelerator, tmp_path):
    run = resume(accelerator, "train", tmp_path, None, Loader())
    assert (run.job, run.step, run.checkpoint) == ("train", 0, None)
    save_checkpoint(accelerator, tmp_path, run, 3, {"position": 7}, {"reason": "interval"}, total_limit=3)
    (checkpoint,) = complete_checkpoints(tmp_path)
    assert state_of(checkpoint) == {"reason": "interval", "job": "train", "run_id": run.run_id, "step": 3}

    loader = Loader()
    resumed = resume(accelerator, "train", tmp_path, "latest", loader)
    assert (resumed.run_id, resumed.step, resumed.checkpoint, loader.position) == (run.run_id, 3, checkpoint, 7)
    save_checkpoint(accelerator, tmp_path, resumed, 5, {"position": 9}, {}, total_limit=3)
    assert state_of(complete_checkpoints(tmp_path)[-1])["run_id"] == run.run_id  # one run across the resume
    assert resume(accelerator, "train", tmp_path / "elsewhere", None, Loader()).run_id != run.run_id


@pytest.mark.parametrize(
    "recorded",
    [{"job": "train_probes", "run_id": "x", "step": 6}, {"step": 6}],  # the second: written before jobs were recorded
)
def test_train_refuses_to_resume_a_probe_checkpoint(accelerator, tmp_path, recorded):
    probe_run = resume(accelerator, "train_probes", tmp_path, None, Loader())
    checkpoint = save_checkpoint(accelerator, tmp_path, probe_run, 6, {"position": 4}, {}, total_limit=3)
    (checkpoint / "training_state.json").write_text(json.dumps(recorded))
    loader = Loader()
    with pytest.raises(OutputFolderError, match=rf"checkpoint of train_probes, not of train.*{tmp_path}"):
        resume(accelerator, "train", tmp_path, "latest", loader)
    assert loader.position == 0  # refused before anything was restored
    # The probe job itself resumes it.
    assert resume(accelerator, "train_probes", tmp_path, "latest", Loader()).step == 6


def test_fresh_start_into_used_folder_stops_or_with_overwrite_removes_the_old_run(accelerator, tmp_path):
    old = resume(accelerator, "train", tmp_path, None, Loader())
    for step in (2, 4):
        save_checkpoint(accelerator, tmp_path, old, step, {"position": step}, {}, total_limit=3)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "empty_model").mkdir()  # an empty folder holds no run
    outputs = [tmp_path / name for name in ("checkpoints", "config.yaml", "controlnet", "empty_model")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    with pytest.raises(OutputFolderError) as refused:
        prepare_fresh_start(accelerator, outputs, None, False, hint="choose another folder with logging.output_dir=DIR")
    message = str(refused.value)
    assert "checkpoints/ (checkpoint-2, checkpoint-4)" in message and "config.yaml" in message
    assert "empty_model" not in message and "controlnet" not in message
    for advice in ("logging.resume=latest", "logging.output_dir=DIR", "logging.overwrite=true"):
        assert advice in message
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing touched

    prepare_fresh_start(accelerator, outputs, "latest", False, hint="")  # a resume is no fresh start
    with pytest.raises(OutputFolderError, match="pass only one"):
        prepare_fresh_start(accelerator, outputs, "latest", True, hint="")

    prepare_fresh_start(accelerator, outputs, None, True, hint="")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()
    assert resume(accelerator, "train", tmp_path, "latest", Loader()).checkpoint is None  # nothing left to pick up


def test_resume_applies_the_configs_lr_and_settings_at_the_schedules_position():
    """Loading an optimizer's state puts back the saved lr, betas and weight decay; apply_optimizer_config sets this
    run's: each group's lr is its new base lr x this run's schedule (here a warm-up of 20 steps instead of 10) at the
    resumed step, and the next scheduler step continues from there."""
    from diffusers.optimization import get_scheduler

    def make(lr, scale, beta1, warmup):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
        groups = [{"params": a.parameters(), "lr": lr}, {"params": b.parameters(), "lr": lr * scale}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, 0.999), weight_decay=1e-2)
        return a, b, optimizer, get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)

    a, b, optimizer, scheduler = make(1e-3, 10.0, 0.9, warmup=10)
    for _ in range(4):  # 4 of 10 warm-up steps: every lr is 0.4 x its base
        (a(torch.ones(1, 3)).sum() + b(torch.ones(1, 3)).sum()).backward()
        optimizer.step()
        scheduler.step()
    saved = (optimizer.state_dict(), scheduler.state_dict())
    _, _, resumed, resumed_scheduler = make(1e-4, 3.0, 0.8, warmup=20)
    wanted = optimizer_settings(resumed, resumed_scheduler)  # as this run built it, before the checkpoint loads
    assert wanted == [
        {"lr": 1e-4, "betas": (0.8, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
        {"lr": pytest.approx(3e-4), "betas": (0.8, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
    ]
    resumed.load_state_dict(saved[0])
    resumed_scheduler.load_state_dict(saved[1])
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([4e-4, 4e-3])  # the checkpoint's, not ours
    changes = apply_optimizer_config(resumed, wanted, resumed_scheduler)
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([0.2e-4, 0.2 * 3e-4])  # step 4 of 20
    assert resumed_scheduler.get_last_lr() == pytest.approx([0.2e-4, 0.2 * 3e-4])
    assert [tuple(g["betas"]) for g in resumed.param_groups] == [(0.8, 0.999)] * 2
    assert changes == [
        "group 0 base lr 0.001 -> 0.0001",
        "group 0 betas (0.9, 0.999) -> (0.8, 0.999)",
        "group 1 base lr 0.01 -> 0.0003",
        "group 1 betas (0.9, 0.999) -> (0.8, 0.999)",
    ]
    resumed_scheduler.step()  # warm-up step 5 of 20, from the new base lrs
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([0.25e-4, 0.25 * 3e-4])
    assert apply_optimizer_config(resumed, wanted, resumed_scheduler) == []

    # Without a scheduler (probe training) the group's lr is its base lr.
    plain = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3, weight_decay=0.0)
    assert apply_optimizer_config(plain, [{"lr": 5e-4, "weight_decay": 0.1}]) == [
        "group 0 base lr 0.001 -> 0.0005",
        "group 0 weight_decay 0.0 -> 0.1",
    ]
    assert plain.param_groups[0]["lr"] == 5e-4 and plain.param_groups[0]["weight_decay"] == 0.1


def test_a_resume_logs_each_config_change_and_keeps_the_previous_config(tmp_path, caplog):
    """config.yaml is the run's latest config; a resume with other values names each changed key (nested keys, lists,
    a key only one side has) and keeps the previous file in config_history, named by the step it trained up to. How
    the invocation starts (logging.resume / logging.overwrite) is no change; a fresh start compares nothing."""
    from omegaconf import OmegaConf

    first = OmegaConf.create(
        {"optim": {"lr": 1e-4, "batch_size": 8}, "loss": {"window": [0, 400]}, "logging": {"resume": None}}
    )
    assert record_config(tmp_path, first, 0, resumed=False) == []
    assert OmegaConf.load(tmp_path / "config.yaml") == first

    same = OmegaConf.merge(first, {"logging": {"resume": "latest", "overwrite": False}})
    assert record_config(tmp_path, same, 100, resumed=True) == []
    assert not (tmp_path / "config_history").exists()

    second = OmegaConf.create(
        {"optim": {"lr": 5e-4, "batch_size": 8}, "loss": {"window": [0, 999]}, "logging": {"resume": "latest"},
         "seed": 1}
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="innercontrol.checkpoints"):
        changes = record_config(tmp_path, second, 200, resumed=True)
    assert changes == ["loss.window: [0, 400] -> [0, 999]", "optim.lr: 0.0001 -> 0.0005", "seed: (absent) -> 1"]
    assert "resumed at step 200 with 3 config change(s)" in caplog.text and "optim.lr: 0.0001 -> 0.0005" in caplog.text
    kept = tmp_path / "config_history" / "config-until-step-200.yaml"
    assert OmegaConf.load(kept) == same  # the config that trained steps 100-200
    assert OmegaConf.load(tmp_path / "config.yaml") == second
    assert not list(tmp_path.glob("*tmp*"))  # no temporary file left beside config.yaml

    # resumed at step 200 again (a crash before the next checkpoint), with a third config: both earlier ones stay
    third = OmegaConf.merge(second, {"optim": {"lr": 1e-3}})
    assert record_config(tmp_path, third, 200, resumed=True) == ["optim.lr: 0.0005 -> 0.001"]
    assert OmegaConf.load(kept) == same
    assert OmegaConf.load(tmp_path / "config_history" / "config-until-step-200-1.yaml") == second

    # started over in the same folder (the run's config is replaced, nothing compared, the earlier run's history
    # set aside: e.g. logging.resume=latest that found no checkpoint), twice
    assert record_config(tmp_path, first, 0, resumed=False) == []
    assert OmegaConf.load(tmp_path / "config.yaml") == first
    assert not (tmp_path / "config_history").exists()
    assert OmegaConf.load(tmp_path / "config_history-earlier-run" / "config-until-step-200.yaml") == same
    (tmp_path / "config_history").mkdir()
    assert record_config(tmp_path, first, 0, resumed=False) == []
    assert (tmp_path / "config_history-earlier-run-1").is_dir() and not (tmp_path / "config_history").exists()
