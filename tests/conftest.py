"""Shared fixtures: the tiny pipeline is built once per session, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder holding the tiny pipeline in the hub layout (python -m innercontrol.tiny)."""
    from innercontrol.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts without an initialised accelerate state (an Accelerator made by one test would otherwise
    fix the device and mixed precision of every later one)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """Folder holding the tiny SDXL pipeline, its ControlNet and T2I-Adapter (python -m innercontrol.tiny --family
    sdxl)."""
    from innercontrol.tiny import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))
