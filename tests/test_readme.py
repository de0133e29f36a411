"""Every command in the README names something that exists; blocks marked `<!-- tiny -->` are run."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(<!-- tiny -->\n)?```bash\n(.*?)```", re.S)


def commands():
    for marker, body in BLOCK.findall(README):
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                yield bool(marker), line


def test_readme_starts_with_the_two_commands():
    first = next(commands())
    assert first == (False, "make demo")
    assert "make test" in [line for _, line in commands()][:2]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("line", sorted({line for _, line in commands()}))
def test_every_command_names_something_that_exists(line):
    words = shlex.split(line)
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]  # leading VAR=value assignments
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), re.M), line
        return
    for word in words:
        if word.endswith(".sh") or word.endswith(".yml") or word.endswith(".yaml"):
            assert (ROOT / word).is_file(), f"{word} in `{line}` does not exist"
    if "-m" in words:
        module = words[words.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"module {module} in `{line}` does not exist"


@pytest.mark.slow
def test_tiny_blocks_run(tmp_path):
    tiny = [line for marked, line in commands() if marked]
    assert tiny, "the README has no block marked <!-- tiny -->"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    for line in tiny:
        words = shlex.split(line)
        if words[0] == "python":
            words[0] = sys.executable
        result = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"`{line}` failed:\n{result.stderr[-2000:]}"


def test_committed_outputs_carry_no_absolute_paths():
    """Tables and reports committed to the repository name relative paths only (not this machine's folders)."""
    committed = [*(ROOT / "images").glob("*.md"), *(ROOT / "bench").glob("*.md"), ROOT / "checkpoints" / "README.md"]
    absolute = re.compile(r"(?<![\w.])/(work|root|home|tmp|Users|mnt|opt)/")
    found = {p.name: absolute.findall(p.read_text()) for p in committed if p.is_file()}
    assert committed and not {name: hits for name, hits in found.items() if hits}
    assert all(str(ROOT) not in p.read_text() for p in committed if p.is_file())
