"""Training entry points on the tiny pipeline: resume exactness, crash safety, non-finite loss, Ctrl-C, 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from innercontrol.checkpoints import complete_checkpoints, find_checkpoint

from .helpers import record_instances

ROOT = Path(__file__).resolve().parents[1]
RES = 64


@pytest.fixture(scope="module")
def workspace(tiny_dir, tmp_path_factory):
    """Tiny pipeline + synthetic depth set + a random probe for the tiny UNet's attention taps."""
    from diffusers import UNet2DConditionModel

    from innercontrol.controlled_unet import tapped_channels
    from innercontrol.probes import build_probe
    from innercontrol.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("train_ws")
    write_synthetic(root / "synthetic", num=24, resolution=RES, seed=0, val_fraction=0.25)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(0)
    build_probe(tapped_channels(unet, "attn"), 32, 64, tap="attn").save_pretrained(root / "probe")
    return {"tiny": tiny_dir, "data": root / "synthetic", "probe": root / "probe", "root": root}


def overrides(ws, out, steps, *extra):
    return [
        f"model.pretrained_model={ws['tiny']}",
        f"model.controlnet={ws['tiny']}/controlnet",
        f"condition.reward_model={ws['tiny']}/dpt",
        f"data.dataset={ws['data']}",
        f"data.resolution={RES}",
        f"eval.dataset={ws['data']}",
        f"eval.resolution={RES}",
        f"probe.path={ws['probe']}",
        f"logging.output_dir={out}",
        f"optim.max_steps={steps}",
        "optim.batch_size=2",
        "optim.gradient_accumulation=2",
        "logging.checkpoint_every=2",
        "logging.validation_every=0",
        "logging.report_to=none",
        # windows wide enough that both window terms act in almost every step
        "loss.reward_window=[0,999]",
        "model.tap=attn",  # the workspace probe reads attention taps
        *extra,
    ]


def run_train(args):
    from accelerate.state import AcceleratorState, GradientState

    from innercontrol import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), *args])


def weights(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "diffusion_pytorch_model.safetensors")


def test_validation_settings_do_not_change_the_training_run(workspace):
    """Validation grids (drawn here after every step) must not touch the RNG that draws the training noise and
    timesteps, nor the models: the same seed gives the same ControlNet with validation on or off."""
    root = workspace["root"]
    run_train(overrides(workspace, root / "no_validation", 2))
    run_train(overrides(workspace, root / "validation", 2, "logging.validation_every=1"))
    assert len(list((root / "validation" / "validation").glob("*.png"))) == 2
    a, b = weights(root / "no_validation" / "controlnet"), weights(root / "validation" / "controlnet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = weights(workspace["tiny"] / "controlnet")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained


def test_resume_matches_uninterrupted_run(workspace):
    root = workspace["root"]
    run_train(overrides(workspace, root / "straight", 4))
    run_train(overrides(workspace, root / "halves", 2))
    assert [p.name for p in complete_checkpoints(root / "halves")] == ["checkpoint-2"]
    run_train(overrides(workspace, root / "halves", 4, "logging.resume=latest"))
    for name in ("controlnet", "controlnet_ema"):
        straight, halves = weights(root / "straight" / name), weights(root / "halves" / name)
        assert straight.keys() == halves.keys()
        for key in straight:
            assert torch.allclose(straight[key], halves[key], rtol=1e-5, atol=1e-7), (name, key)
    start = weights(Path(workspace["tiny"]) / "controlnet")
    assert any(
        not torch.equal(start[k], straight_value)
        for k, straight_value in weights(root / "straight" / "controlnet").items()
    )
    state = json.loads((root / "halves" / "checkpoints" / "checkpoint-4" / "training_state.json").read_text())
    first = json.loads((root / "halves" / "checkpoints" / "checkpoint-2" / "training_state.json").read_text())
    assert state["step"] == 4 and state["job"] == "train"
    assert state["run_id"] == first["run_id"]  # the resume continued the same run
    summary = json.loads((root / "straight" / "summary.json").read_text())
    assert summary["steps"] == 4


def test_latent_cache_trains_the_same_controlnet_encoding_each_row_once(workspace, monkeypatch):
    """optim.latent_cache keeps each row's latent distribution and draws every sample from it with the random numbers
    an encode would draw: 6 steps of 4 rows (the 18 training rows, then 6 of them again) give the ControlNet that
    encoding every batch gives, bit for bit, and the VAE encodes each of the 18 rows once."""
    from innercontrol import train

    caches = record_instances(monkeypatch, train, "LatentCache")
    root = workspace["root"]
    run_train(overrides(workspace, root / "encode_every_batch", 6))
    assert caches == []  # 0, the default: no cache
    run_train(overrides(workspace, root / "latent_cache", 6, "optim.latent_cache=64"))
    (cache,) = caches
    assert (cache.misses, cache.hits) == (18, 6)
    for name in ("controlnet", "controlnet_ema"):
        every, cached = weights(root / "encode_every_batch" / name), weights(root / "latent_cache" / name)
        assert every.keys() == cached.keys()
        assert all(torch.equal(every[key], cached[key]) for key in every), name


def test_corrective_fraction_feeds_the_model_another_images_noisy_latent(workspace, monkeypatch):
    """loss.corrective_fraction=1 over t in [200, 999]: the objective receives, for each row, the previous row's latent
    noised with this row's noise, and a target whose x0 is the row's own latent; at the default 0 the step never
    calls corrective_noise."""
    from innercontrol import train
    from innercontrol.losses import predict_x0

    seen = {"noise": [], "objective": []}
    real_noise, real_objective = train.corrective_noise, train.innercontrol_objective

    def recorded_noise(latents, noise, timesteps, alphas_cumprod, rows):
        seen["noise"].append((latents.clone(), noise.clone(), timesteps.clone(), rows.clone(), alphas_cumprod))
        return real_noise(latents, noise, timesteps, alphas_cumprod, rows)

    def recorded_objective(output, target, noisy, timesteps, *args, **kwargs):
        seen["objective"].append((target.detach().clone(), noisy.detach().clone()))
        return real_objective(output, target, noisy, timesteps, *args, **kwargs)

    monkeypatch.setattr(train, "corrective_noise", recorded_noise)
    monkeypatch.setattr(train, "innercontrol_objective", recorded_objective)
    root = workspace["root"]
    run_train(overrides(workspace, root / "published_noising", 1, "optim.gradient_accumulation=1"))
    assert seen["noise"] == [] and len(seen["objective"]) == 1
    seen["objective"].clear()
    run_train(
        overrides(
            workspace,
            root / "corrective",
            1,
            "optim.gradient_accumulation=1",
            "loss.corrective_fraction=1.0",
            "loss.corrective_window=[200,999]",
        )
    )
    ((latents, noise, t, rows, alphas),) = seen["noise"]
    ((target, noisy),) = seen["objective"]
    assert torch.equal(rows, (t >= 200).to(rows.device)) and rows.any() and latents.shape[0] == 2
    a = alphas[t].view(-1, 1, 1, 1)
    shown = torch.where(rows.view(-1, 1, 1, 1), latents.roll(1, 0), latents)  # the other image where chosen
    assert torch.allclose(noisy, a.sqrt() * shown + (1 - a).sqrt() * noise, atol=1e-5)
    assert torch.allclose(predict_x0(noisy, target, t, alphas), latents, atol=1e-4)  # the tiny UNet: epsilon


def test_resume_trains_on_with_this_configs_lr(workspace, tmp_path):
    """A resume with another optim.lr or optim.ema_decay trains with them, not with the checkpoint's (which loading its
    state restores); a resume that would change the optimizer's groups (optim.zero_conv_lr_scale from 1) is refused by name
    before anything is written."""
    from omegaconf import OmegaConf

    from innercontrol.config import ConfigError

    out = tmp_path / "lr_change"
    run_train(overrides(workspace, out, 2, "optim.lr=1e-2", "optim.warmup_steps=0"))  # an EMA well behind
    at_step_2 = weights(out / "controlnet")
    with pytest.raises(ConfigError, match="cannot resume .* optim.zero_conv_lr_scale"):
        run_train(overrides(workspace, out, 4, "logging.resume=latest", "optim.zero_conv_lr_scale=3"))
    assert not (out / "config_history").exists()  # refused before the run's config.yaml was touched
    ema_at_step_2 = weights(out / "controlnet_ema")
    # lr 1e-12: two more AdamW steps move no weight by more than ~2e-12 (at the checkpoint's 1e-2 they move ~1e-2).
    run_train(overrides(workspace, out, 4, "logging.resume=latest", "optim.lr=1e-12", "optim.ema_decay=0.1"))
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    # the config of steps 1-2 is kept; config.yaml is this resume's
    assert OmegaConf.load(out / "config_history" / "config-until-step-2.yaml").optim.lr == 1e-2
    assert OmegaConf.load(out / "config.yaml").optim.lr == 1e-12
    at_step_4 = weights(out / "controlnet")
    assert max((at_step_4[k] - at_step_2[k]).abs().max().item() for k in at_step_2) < 1e-9
    # EMA updates 3 and 4 decay by min((1 + s) / (10 + s), max) with s = 2, 3: 0.25 and 0.31 at the checkpoint's
    # 0.99, 0.1 and 0.1 at the new ema_decay=0.1, so the EMA's distance to the (unmoved) weights shrinks 100-fold.
    ema_at_step_4 = weights(out / "controlnet_ema")
    for key in at_step_2:
        expected = at_step_2[key] + 0.01 * (ema_at_step_2[key] - at_step_2[key])
        assert torch.allclose(ema_at_step_4[key], expected, atol=1e-7), key
    assert any((ema_at_step_2[k] - at_step_2[k]).abs().max() > 1e-4 for k in at_step_2)  # a distance to shrink
    # the same resume at the run's own lr does move them
    run_train(overrides(workspace, out, 6, "logging.resume=latest"))
    assert max((weights(out / "controlnet")[k] - at_step_4[k]).abs().max().item() for k in at_step_4) > 1e-6


def test_final_controlnet_loads_in_diffusers(workspace):
    from diffusers import ControlNetModel

    out = workspace["root"] / "straight"
    if not (out / "controlnet").exists():
        run_train(overrides(workspace, out, 4))
    net = ControlNetModel.from_pretrained(out / "controlnet")
    ema = ControlNetModel.from_pretrained(out / "controlnet_ema")
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ema.parameters())


def test_crash_mid_save_keeps_previous_checkpoint_latest(workspace, monkeypatch):
    import innercontrol.checkpoints as ckpt

    out = workspace["root"] / "crash"
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if Path(dst).name == "checkpoint-4":
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        run_train(overrides(workspace, out, 6))
    assert find_checkpoint(out, "latest").name == "checkpoint-2"
    assert (out / "checkpoints" / ".tmp-checkpoint-4").is_dir()  # the broken one is never taken as a checkpoint
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    run_train(overrides(workspace, out, 6, "logging.resume=latest"))
    assert [p.name for p in complete_checkpoints(out)][-1] == "checkpoint-6"
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


def test_non_finite_loss_stops_with_step_and_term(workspace, monkeypatch):
    from innercontrol import train

    out = workspace["root"] / "nan"
    real_step = train.training_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # micro-batch 5 = first micro-batch of optimizer step 3
            terms["alignment"] = torch.tensor(float("nan"))
            terms["loss"] = terms["loss"] + terms["alignment"]
        return terms

    monkeypatch.setattr(train, "training_step", poisoned)
    with pytest.raises(train.NonFiniteLossError, match=r"step 3 \(loss=nan, alignment=nan\).*last good checkpoint"):
        run_train(overrides(workspace, out, 6))
    assert find_checkpoint(out, "latest").name == "checkpoint-2"
    assert not (out / "controlnet").exists()


class HostReadSpy:
    """Counts reads of tensor values back to the host made by our training code or diffusers: .item(), bool(),
    float(), int() of any tensor and .cpu() / .tolist() / .numpy() of a floating-point one (the step's host tensors,
    sampled timesteps and window indices, are integer or boolean). On the CPU every tensor is a host tensor, so
    this is how a test without a GPU sees the reads that on CUDA make the host wait for the device."""

    VALUE_READS = ("item", "__bool__", "__float__", "__int__")
    FLOAT_READS = ("cpu", "tolist", "numpy")

    def __init__(self, monkeypatch):
        self.reads: list[str] = []
        for name in self.VALUE_READS + self.FLOAT_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, real):
        spy = self

        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            ours = "/innercontrol/" in caller.co_filename or "/diffusers/" in caller.co_filename
            if ours and (name in spy.VALUE_READS or tensor.is_floating_point()):
                spy.reads.append(f"{Path(caller.co_filename).name}:{caller.co_name}:{name}")
            return real(tensor, *args, **kwargs)

        return read


@pytest.mark.parametrize("log_every", [100, 1])
def test_no_host_read_inside_the_step_loop(workspace, monkeypatch, log_every):
    """The loss values are read once per logging interval, not per micro-step (issue 16): a 4-step run with 2
    micro-batches per step reads them back only where it logs or saves."""
    spy = HostReadSpy(monkeypatch)
    out = workspace["root"] / f"sync-{log_every}"
    extra = (f"logging.log_every={log_every}", "logging.checkpoint_every=100", "data.caption_dropout=0")
    run_train(overrides(workspace, out, 4, *extra))
    read_points = 1 if log_every == 100 else 4  # the last step always logs
    # One copy of the queued values to the host (.cpu()) and its conversion to Python floats, per read point.
    assert spy.reads == ["train.py:read:cpu", "train.py:read:tolist"] * read_points, spy.reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_never_synchronises_on_cuda(workspace, monkeypatch):
    """On CUDA, every micro-step after the first runs under sync debug mode "error": a device-to-host read raises."""
    from innercontrol import train

    real_step, calls = train.training_step, {"n": 0}

    def strict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # first step: lazy set-up (cuBLAS handles, allocator) may synchronise
            return real_step(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train, "training_step", strict)
    out = workspace["root"] / "cuda-sync"
    run_train(overrides(workspace, out, 3, "model.reward_cuda_graph=false", "logging.log_every=100"))
    assert calls["n"] == 6


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_fresh_run_into_a_used_folder_stops_before_touching_it(workspace):
    from innercontrol.checkpoints import OutputFolderError

    out = workspace["root"] / "used"
    run_train(overrides(workspace, out, 4))
    old_run = json.loads((out / "summary.json").read_text())["run_id"]
    before = snapshot(out)
    assert {"checkpoints/checkpoint-4", "controlnet", "config.yaml"} <= before.keys()
    with pytest.raises(OutputFolderError) as refused:
        run_train(overrides(workspace, out, 2))
    message = str(refused.value)
    for found in ("checkpoints/ (checkpoint-2, checkpoint-4)", "controlnet/", "config.yaml"):
        assert f"{out}/{found}" in message
    for advice in ("logging.resume=latest", "logging.output_dir=DIR", "logging.overwrite=true"):
        assert advice in message
    assert snapshot(out) == before  # no file written, replaced or removed

    # Resuming a run that already reached max_steps keeps its final model as it is.
    run_train(overrides(workspace, out, 4, "logging.resume=latest"))
    assert snapshot(out) == before

    # overwrite=true starts over: the old run's checkpoints are gone, so resume=latest cannot pick them up; so is
    # the config history of a run before it (set aside by record_config when that run started over here).
    (out / "config_history-earlier-run").mkdir()
    (out / "config_history-earlier-run" / "config-until-step-4.yaml").write_text("seed: 0\n")
    run_train(overrides(workspace, out, 2, "logging.overwrite=true"))
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "config_history-earlier-run").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["run_id"] != old_run


def test_stop_request_saves_a_checkpoint_and_exits_with_its_own_code(workspace, monkeypatch):
    from innercontrol import train

    out = workspace["root"] / "stopped"
    real_step = train.training_step
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # micro-batch 3 = first micro-batch of optimizer step 2
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; StopRequest catches it
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "training_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exited:
        run_train(overrides(workspace, out, 6, "logging.checkpoint_every=100"))
    assert exited.value.code == train.STOPPED_EXIT_CODE == 75
    (checkpoint,) = complete_checkpoints(out)
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert (checkpoint.name, state["reason"], state["job"]) == ("checkpoint-2", "stop requested", "train")
    assert not (out / "controlnet").exists()  # not a finished run
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_corrective_fraction_without_a_second_image_in_the_batch_is_refused(workspace):
    from innercontrol.config import ConfigError

    with pytest.raises(ConfigError, match=r"loss.corrective_fraction > 0 .* optim.batch_size=1 .* has none"):
        run_train(overrides(workspace, workspace["root"] / "corrective_b1", 1, "optim.batch_size=1",
                            "loss.corrective_fraction=0.5"))  # fmt: skip
    assert not (workspace["root"] / "corrective_b1").exists()


def test_probe_that_does_not_fit_the_taps_is_refused(workspace):
    with pytest.raises(ValueError, match=r"expects tapped channels .* model.tap=conv on this UNet gives"):
        run_train(overrides(workspace, workspace["root"] / "wrongtap", 2, "model.tap=conv"))


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_then_exits(workspace):
    from innercontrol import train

    out = workspace["root"] / "sigint"
    log = workspace["root"] / "sigint.log"
    args = overrides(workspace, out, 1000, "logging.checkpoint_every=1000")
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "innercontrol.train", "--config", str(ROOT / "configs" / "tiny.yaml"), *args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.time() + 120
        while "training from step" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == train.STOPPED_EXIT_CODE, log.read_text()[-2000:]
    latest = find_checkpoint(out, "latest")
    assert latest is not None and int(latest.name.split("-")[1]) >= 1
    assert json.loads((latest / "training_state.json").read_text())["reason"] == "stop requested"


@pytest.mark.slow
def test_two_process_accelerate_launch(workspace):
    out = workspace["root"] / "ddp"
    args = overrides(workspace, out, 4, "logging.validation_every=4")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "train" / "config.yml"),
        "--num_processes",
        "2",
        "-m",
        "innercontrol.train",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        *args,
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    latest = complete_checkpoints(out)[-1]
    assert (latest / "data_state_0.json").is_file() and (latest / "data_state_1.json").is_file()
    data = [json.loads((latest / f"data_state_{i}.json").read_text()) for i in (0, 1)]
    assert data[0] != data[1]  # each process keeps its own position in its own shard
    from diffusers import ControlNetModel

    ControlNetModel.from_pretrained(out / "controlnet")
    assert (out / "validation" / "step-000004.png").is_file()


def test_controlnet_from_unet_when_none_is_given(workspace):
    from diffusers import ControlNetModel, UNet2DConditionModel

    out = workspace["root"] / "from_unet"
    run_train(overrides(workspace, out, 2, "model.controlnet=null", "loss.reward_weight=0", "loss.alignment_weight=0"))
    net = ControlNetModel.from_pretrained(out / "controlnet")
    unet = UNet2DConditionModel.from_pretrained(workspace["tiny"], subfolder="unet")
    assert list(net.config.block_out_channels) == list(unet.config.block_out_channels)
    # from_unet copies the UNet's encoder: after 2 small steps it is still close to it, but trained.
    copied = net.down_blocks[0].resnets[0].conv1.weight
    original = unet.down_blocks[0].resnets[0].conv1.weight
    assert torch.allclose(copied, original, atol=1e-2) and not torch.equal(copied, original)


def test_controls_computed_on_the_fly_for_image_conditions(workspace):
    # canny has no stored control column: the training step computes it from the images (and rewards with it).
    out = workspace["root"] / "canny"
    run_train(
        overrides(
            workspace,
            out,
            2,
            "condition.name=canny",
            "condition.reward_model=null",
            "data.control_column=null",
            "loss.alignment_weight=0",
            "logging.validation_every=2",
        )
    )
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "validation" / "step-000002.png").is_file()


@pytest.mark.parametrize("name", ["hed", "lineart"])
def test_training_with_annotator_rewards_updates_the_controlnet(workspace, name):
    # Random weights in the published architectures (spec files): the reward's gradient reaches the ControlNet.
    spec = json.loads((Path(__file__).resolve().parent / "specs" / f"{name}.json").read_text())
    weights_file = workspace["root"] / f"{name}.pth"
    torch.manual_seed(0)
    torch.save({k: torch.randn(shape) * 0.05 for k, shape in spec["state_dict"].items()}, weights_file)
    runs = {}
    for reward in (1, 0):
        out = workspace["root"] / f"reward_{name}_{reward}"
        run_train(
            overrides(
                workspace,
                out,
                2,  # the first step has lr 0 (warm-up starts at 0)
                f"condition.name={name}",
                f"condition.reward_model={weights_file}",
                "data.control_column=null",
                "loss.alignment_weight=0",
                "loss.reward_window=[0,999]",
                f"loss.reward_weight={reward}",
            )
        )
        assert json.loads((out / "summary.json").read_text())["steps"] == 2
        runs[reward] = weights(out / "controlnet")
    # Same seed and data: the runs differ only by the reward term, so its gradient changed the ControlNet.
    assert any(not torch.allclose(runs[1][k], runs[0][k], atol=1e-7) for k in runs[1])


def test_bf16_mixed_precision_training_runs(workspace):
    """Half-precision frozen models with an fp32 ControlNet under autocast, every loss term on (as on a GPU), and
    the validation grid of the fp32 (EMA) ControlNet with the bf16 UNet."""
    out = workspace["root"] / "bf16"
    bf16 = ("optim.mixed_precision=bf16", "optim.gradient_accumulation=1", "logging.validation_every=2")
    run_train(overrides(workspace, out, 2, *bf16))
    assert (out / "validation" / "step-000002.png").is_file()
    start, final = weights(Path(workspace["tiny"]) / "controlnet"), weights(out / "controlnet")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(start[k], final[k]) for k in final)


def test_ema_decay_follows_the_diffusers_warm_up_schedule():
    """decay_k = min((1 + s) / (10 + s), max) with s = k - 1 (0 at the first update), checked against diffusers'
    EMAModel stepping the same parameter sequence; a fixed decay would keep the initial weights far longer."""
    from diffusers.training_utils import EMAModel

    from innercontrol.train import EMA, ema_decay_at

    assert [ema_decay_at(k, 0.9999) for k in (1, 2, 3, 11)] == [0.0, 2 / 11, 3 / 12, 11 / 20]
    assert ema_decay_at(100_000, 0.9999) == 0.9999 and ema_decay_at(50, 0.5) == 0.5
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ours = EMA(model, decay=0.99)
    reference = EMAModel(model.parameters(), decay=0.99)
    for _ in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        used = ours.update(model)
        reference.step(model.parameters())
        assert used == pytest.approx(reference.cur_decay_value)
    for mine, theirs in zip(ours.shadow.parameters(), reference.shadow_params):
        torch.testing.assert_close(mine, theirs)
    # After 500 updates at the anchors' 0.9999 the EMA holds ~2% of the initial weights, not ~95%.
    initial_share = 1.0
    for k in range(1, 501):
        initial_share *= ema_decay_at(k, 0.9999)
    assert initial_share < 0.03


def test_ema_resume_continues_the_decay_sequence():
    from innercontrol.train import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    straight = EMA(model, decay=0.999)
    resumed = EMA(model, decay=0.999)
    steps = [[torch.randn_like(p) for p in model.parameters()] for _ in range(8)]
    for k, deltas in enumerate(steps):
        with torch.no_grad():
            for p, d in zip(model.parameters(), deltas):
                p.add_(d)
        straight.update(model)
        if k < 4:
            resumed.update(model)
        if k == 3:  # "checkpoint" and restore into a fresh EMA (built from the current weights, as on resume)
            state = resumed.state_dict()
            assert state["updates"] == 4
            resumed = EMA(model, decay=0.5)
            resumed.load_state_dict(state)
            assert resumed.max_decay == 0.999
        elif k > 3:
            resumed.update(model)
    assert straight.updates == resumed.updates == 8
    for a, b in zip(straight.shadow.parameters(), resumed.shadow.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="update count"):
        EMA(model, 0.9).load_state_dict({"decay": 0.9, "weights": model.state_dict()})


def test_fused_adamw_takes_the_same_steps_as_adamw_and_8bit_names_what_it_needs():
    from types import SimpleNamespace

    from innercontrol.config import ConfigError
    from innercontrol.train import build_optimizer

    cfg = SimpleNamespace(lr=1e-2, adam_beta1=0.9, adam_beta2=0.99, weight_decay=1e-2, adam_eps=1e-8)
    results = {}
    for kind in ("adamw", "adamw_fused"):
        torch.manual_seed(0)
        net = torch.nn.Linear(8, 4)
        initial = net.weight.detach().clone()
        optimizer = build_optimizer(SimpleNamespace(optimizer=kind, **vars(cfg)), net.parameters(), "cpu")
        assert isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults["fused"]) is (kind == "adamw_fused")
        for step in range(5):
            net(torch.randn(16, 8, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results[kind] = net.weight.detach().clone()
    assert (results["adamw"] - initial).abs().mean() > 1e-3  # the weights moved
    torch.testing.assert_close(results["adamw_fused"], results["adamw"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="adamw_8bit"):
        build_optimizer(SimpleNamespace(optimizer="adamw_8bit", **vars(cfg)), torch.nn.Linear(2, 2).parameters(), "cpu")


def test_zero_conv_lr_scale_groups_exactly_the_zero_initialised_layers():
    """optim.zero_conv_lr_scale: the second group holds the layers from_unet starts at zero (found independently as the
    all-zero weights of a fresh ControlNet), and one AdamW step moves them scale times as far as the rest."""
    from types import SimpleNamespace

    from diffusers import ControlNetModel, UNet2DConditionModel

    from innercontrol.config import ConfigError
    from innercontrol.tiny import UNET_CONFIG
    from innercontrol.train import build_optimizer, parameter_groups

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel(**UNET_CONFIG))
    params = dict(controlnet.named_parameters())
    assert parameter_groups(controlnet, 1e-3) == list(params.values())  # the published recipe: one group

    groups = parameter_groups(controlnet, 1e-3, 10.0)
    assert [group["lr"] for group in groups] == [1e-3, pytest.approx(1e-2)]
    ids = {id(param): name for name, param in params.items()}
    grouped = {ids[id(param)].rsplit(".", 1)[0] for param in groups[1]["params"]}
    zero_weights = {
        name.rsplit(".", 1)[0] for name, param in params.items() if name.endswith(".weight") and not param.any()
    }
    assert grouped == zero_weights and len(zero_weights) == len(controlnet.controlnet_down_blocks) + 2
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(params)

    cfg = SimpleNamespace(optimizer="adamw", lr=1e-3, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, adam_eps=1e-8)
    optimizer = build_optimizer(cfg, groups, "cpu")
    before = {name: param.detach().clone() for name, param in params.items()}
    for param in params.values():
        param.grad = torch.ones_like(param)
    optimizer.step()  # Adam's first step moves every element by lr (its group's) when the gradient is constant
    moved = {name: (param.detach() - before[name]).abs().max().item() for name, param in params.items()}
    assert moved["controlnet_mid_block.weight"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["controlnet_cond_embedding.conv_out.bias"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["controlnet_cond_embedding.conv_in.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["conv_in.weight"] == pytest.approx(1e-3, rel=1e-3)

    with pytest.raises(ConfigError, match="zero_conv_lr_scale=1.0"):
        parameter_groups(torch.nn.Linear(2, 2), 1e-3, 10.0)
