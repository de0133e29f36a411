"""bench/latent_cache.py's bookkeeping, with the training commands replaced by stand-ins: the commands it runs, the
order, the table's arithmetic and the bit-identity check (the cache itself is tested in test_models / test_train)."""

import pytest

from .helpers import load_bench_script


def fake_runs(monkeypatch, bench, seconds: dict, controlnet_bytes: dict):
    """Replace bench.timed: record each command, write what the real one writes, return the given wall time."""
    commands = []

    def timed(command, log):
        commands.append(command)
        settings = dict(arg.split("=", 1) for arg in command if "=" in arg)
        cache = int(settings.get("optim.latent_cache", -1))
        if "innercontrol.synthetic" in command:
            out = command[command.index("--out") + 1]
            (bench.Path(out)).mkdir(parents=True)
            (bench.Path(out) / "README.md").write_text("scenes")
            return 1.0
        if "innercontrol.train_probes" in command:
            folder = bench.Path(settings["probe.path"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "probe.safetensors").write_bytes(b"probe")
            return seconds[("probe", cache)]
        folder = bench.Path(settings["logging.output_dir"]) / "controlnet"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(controlnet_bytes[cache])
        return seconds[("train", cache)]

    monkeypatch.setattr(bench, "timed", timed)
    return commands


def test_table_compares_both_settings_and_checks_the_weights(tmp_path, monkeypatch, capsys):
    bench = load_bench_script("latent_cache")
    seconds = {("probe", 0): 100.0, ("probe", 64): 60.0, ("train", 0): 200.0, ("train", 64): 150.0}
    commands = fake_runs(monkeypatch, bench, seconds, {0: b"same", 64: b"same"})
    out = tmp_path / "TABLE.md"
    bench.main(["--steps", "7", "--cache", "64", "--work", str(tmp_path / "work"), "--out", str(out)])
    modules = [c[c.index("-m") + 1] for c in commands]
    synthetic = commands[0]
    given = {synthetic[i]: synthetic[i + 1] for i in range(synthetic.index("--out") + 2, len(synthetic), 2)}
    assert given == {"--num": "640", "--resolution": "64", "--supersample": "2", "--seed": "1"}  # the demo's scenes
    assert modules == ["innercontrol.synthetic"] + ["innercontrol.train_probes"] * 2 + ["innercontrol.train"] * 2
    caches = [next(a for a in c if a.startswith("optim.latent_cache=")) for c in commands[1:]]
    assert caches == ["optim.latent_cache=0", "optim.latent_cache=64", "optim.latent_cache=64", "optim.latent_cache=0"]
    assert all("probe.max_steps=7" in c for c in commands[1:3]) and all("optim.max_steps=7" in c for c in commands[3:])
    # both training runs read the same probe: the one trained without the cache
    assert all(f"probe.path={tmp_path / 'work' / 'probe_cache0'}" in c for c in commands[3:])
    table = out.read_text()
    assert "| probe pretraining (`innercontrol.train_probes`) | 100.0 | 60.0 | 40.0 | 0.60 | yes |" in table
    assert "| ControlNet training (`innercontrol.train`) | 200.0 | 150.0 | 50.0 | 0.75 | yes |" in table
    assert "`python bench/latent_cache.py --steps 7 --cache 64`" in table and str(tmp_path) not in table

    commands.clear()
    bench.main(["--steps", "7", "--cache", "64", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert "innercontrol.synthetic" not in commands[0]  # the scenes written by the first run are reused


def test_weights_that_differ_are_reported_and_fail(tmp_path, monkeypatch):
    bench = load_bench_script("latent_cache")
    seconds = {("probe", 0): 1.0, ("probe", 1024): 1.0, ("train", 0): 2.0, ("train", 1024): 1.0}
    fake_runs(monkeypatch, bench, seconds, {0: b"one", 1024: b"other"})
    out = tmp_path / "TABLE.md"
    with pytest.raises(SystemExit, match="changed the trained weights"):
        bench.main(["--work", str(tmp_path / "work"), "--out", str(out)])
    assert "| ControlNet training (`innercontrol.train`) | 2.0 | 1.0 | 1.0 | 0.50 | NO |" in out.read_text()
    with pytest.raises(SystemExit):
        bench.main(["--cache", "0"])
