import subprocess
import sys
from pathlib import Path

import pytest

from innercontrol import evaluate, train, train_probes
from innercontrol.cli import run_cli
from innercontrol.config import ConfigError
from innercontrol.probes import ProbeLoadError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["innercontrol.train", "innercontrol.train_probes", "innercontrol.evaluate"])
def test_config_error_is_one_line_without_traceback(module):
    args = ["--config", "configs/tiny.yaml", "optim.batch_sise=1"]
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"python -m {module}: error: unknown config key 'optim.batch_sise' in the command line: "
        "did you mean 'optim.batch_size'?"
    ]


def test_user_errors_exit_with_their_code_and_bugs_keep_the_traceback(monkeypatch, capsys):
    def fails(err):
        def main():
            raise err

        return main

    monkeypatch.delenv("INNERCONTROL_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        run_cli(fails(ProbeLoadError("probe file 'p.pt' is not a checkpoint")))
    assert stop.value.code == 1
    assert capsys.readouterr().err.endswith(": error: probe file 'p.pt' is not a checkpoint\n")
    with pytest.raises(SystemExit) as stop:
        run_cli(fails(FileNotFoundError("input folder 'x' does not exist")))
    assert stop.value.code == 1
    with pytest.raises(KeyError):  # not a user error: a bug, raised as is
        run_cli(fails(KeyError("unet")))
    monkeypatch.setenv("INNERCONTROL_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        run_cli(fails(ConfigError("optim.lr=0 is not allowed")))


def test_overrides_may_follow_options():
    args = evaluate.parse_args(
        ["--config", "c.yaml", "eval.output_dir=X", "--metrics", "clip", "eval.guidance_scale=3", "--probe", "p"]
    )
    assert args.overrides == ["eval.output_dir=X", "eval.guidance_scale=3"]
    assert args.metrics == ["clip"] and args.probe == "p" and args.config == "c.yaml"
    assert train.parse_args(["optim.lr=1", "--config", "c.yaml", "optim.batch_size=2"]).overrides == [
        "optim.lr=1",
        "optim.batch_size=2",
    ]
    assert train_probes.parse_args(["a=1", "--config", "c.yaml", "b=2"]).overrides == ["a=1", "b=2"]


def test_every_entry_point_runs_through_run_cli():
    for name in ("train", "train_probes", "evaluate", "annotate", "tiny", "synthetic", "demo"):
        main_block = (ROOT / "innercontrol" / f"{name}.py").read_text().split('if __name__ == "__main__":')[-1]
        assert "run_cli(main)" in main_block, name


def test_run_stopping_errors_of_the_entry_points_are_user_errors():
    """A used output folder and a failed probe end with one line and exit code 1, like a collapsed probe."""
    from innercontrol.checkpoints import OutputFolderError
    from innercontrol.cli import user_error_code
    from innercontrol.train_probes import CollapsedProbeError, FailedProbeError

    for error in (OutputFolderError("used"), FailedProbeError("worse"), CollapsedProbeError("flat")):
        assert user_error_code(error) == 1
    assert user_error_code(RuntimeError("a bug")) is None
