"""train/*.sh and eval/*.sh: accelerate from the project's venv, one process per visible GPU (scripts/launch.sh)."""

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "train/aligned_depth.sh": ("innercontrol.train", "configs/depth.yaml", []),
    "train/aligned_hed.sh": ("innercontrol.train", "configs/hed.yaml", []),
    "train/aligned_linedrawing.sh": ("innercontrol.train", "configs/lineart.yaml", []),
    "train/aligned_sdxl_depth.sh": ("innercontrol.train", "configs/sdxl_depth.yaml", []),
    "train/aligned_sdxl_hed.sh": ("innercontrol.train", "configs/sdxl_hed.yaml", []),
    "train/aligned_sdxl_lineart.sh": ("innercontrol.train", "configs/sdxl_lineart.yaml", []),
    "train/train_probes.sh": ("innercontrol.train_probes", "configs/probe_depth.yaml", ["depth"]),
    "eval/eval_depth.sh": ("innercontrol.evaluate", "configs/depth.yaml", ["CN"]),
    "eval/eval_hed.sh": ("innercontrol.evaluate", "configs/hed.yaml", ["CN"]),
    "eval/eval_linedrawing.sh": ("innercontrol.evaluate", "configs/lineart.yaml", ["CN"]),
    "eval/eval_clip.sh": ("innercontrol.evaluate", "configs/depth.yaml", ["CN"]),
    "eval/eval_fid.sh": ("innercontrol.evaluate", "configs/depth.yaml", ["CN"]),
}
BARE_PATH = "/usr/bin:/bin"  # no accelerate, no nvidia-smi


def recording_venv(folder: Path) -> Path:
    """A stand-in venv whose python writes the command line it was given instead of launching anything."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "accelerate"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*"\n')
        (bin_dir / name).chmod(0o755)
    return folder


def launched(script: str, *args: str, **env: str) -> list[str]:
    done = subprocess.run(
        ["bash", script, *args], cwd=ROOT, env={"HOME": os.environ.get("HOME", "/tmp"), **env}, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    return shlex.split(done.stdout.decode())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_scripts_use_the_venv_and_one_process_per_visible_gpu(script, tmp_path):
    module, config, positional = SCRIPTS[script]
    venv = recording_venv(tmp_path / "venv")
    command = launched(script, *positional, "a.b=1", VENV=str(venv), PATH=BARE_PATH, CUDA_VISIBLE_DEVICES="")
    assert command[:3] == ["python", "-m", "accelerate.commands.launch"]  # the venv's python, no activation
    default_config = f"{script.split('/')[0]}/config.yml"
    assert command[command.index("--config_file") + 1] == default_config
    assert command[command.index("--num_processes") + 1] == "1"  # no GPU: one process, not the config's 8
    assert command[command.index("-m", 2) + 1] == module and command[-1] == "a.b=1"
    assert Path(command[command.index("--config") + 1]).resolve() == ROOT / config


def test_process_count_follows_gpus_unless_the_user_decides(tmp_path):
    venv = str(recording_venv(tmp_path / "venv"))
    script = "train/aligned_depth.sh"

    def processes(**env):
        command = launched(script, VENV=venv, **{"PATH": BARE_PATH, **env})
        return command[command.index("--num_processes") + 1] if "--num_processes" in command else None

    assert processes(CUDA_VISIBLE_DEVICES="0,3") == "2"
    assert processes(CUDA_VISIBLE_DEVICES="-1") == "1"
    fake_smi = tmp_path / "smi"
    fake_smi.mkdir()
    (fake_smi / "nvidia-smi").write_text('#!/bin/sh\nprintf "GPU 0: H100 (UUID: a)\\nGPU 1: H100 (UUID: b)\\n"\n')
    (fake_smi / "nvidia-smi").chmod(0o755)
    assert processes(PATH=f"{fake_smi}:{BARE_PATH}") == "2"  # CUDA_VISIBLE_DEVICES unset: nvidia-smi -L
    assert processes(CUDA_VISIBLE_DEVICES="0,1", NUM_PROCESSES="5") == "5"
    # The user's own accelerate config decides the process count.
    assert processes(CUDA_VISIBLE_DEVICES="0,1", ACCELERATE_CONFIG="train/multinode.yml") is None


def test_without_venv_accelerate_comes_from_path_or_the_error_says_what_to_install(tmp_path):
    on_path = recording_venv(tmp_path / "elsewhere") / "bin"
    missing = str(tmp_path / "no-venv")
    command = launched("eval/eval_clip.sh", "CN", VENV=missing, PATH=f"{on_path}:{BARE_PATH}", CUDA_VISIBLE_DEVICES="")
    assert command[:2] == ["accelerate", "launch"] and "--num_processes" in command
    done = subprocess.run(
        ["bash", "eval/eval_clip.sh", "CN"], cwd=ROOT, env={"VENV": missing, "PATH": BARE_PATH}, capture_output=True
    )
    error = done.stderr.decode()
    assert done.returncode == 127 and "accelerate not found" in error and "make test" in error
    assert "pip install -r requirements.txt" in error


def test_real_script_on_the_cpu_starts_one_process(tmp_path):
    """The real launch through this interpreter's venv: a bad override fails once, not once per configured GPU."""
    if not (Path(sys.prefix) / "bin" / "accelerate").is_file():
        pytest.skip("the tests do not run from a venv with accelerate (make test creates .venv)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PATH": BARE_PATH,
        "VENV": sys.prefix,
        "CUDA_VISIBLE_DEVICES": "",
        "MAIN_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    done = subprocess.run(
        ["bash", "train/train_probes.sh", "depth", "probe.max_stpes=3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode != 0
    assert output.count("did you mean 'probe.max_steps'?") == 1, output[-3000:]
