"""What optim.latent_cache saves: probe pretraining and ControlNet training with and without it, side by side.

    python bench/latent_cache.py                    # the miniature as make demo trains it (300 steps each), ~17 min
    python bench/latent_cache.py --steps 100        # a shorter look (~7 min; fewer epochs, so less to save)

Runs the real entry points (`python -m innercontrol.train_probes`, then `python -m innercontrol.train` with that
probe) on the config, each once with optim.latent_cache=0 (encode every batch, as published) and once with --cache,
in one run and in alternating order (probe: without first; training: with first) so that a slow spell of the
machine hits both alike. Each row is the wall time of the whole command (loading, training, the probe's accuracy
table, saving), what a user waits for. The cache must not change what is trained: the table also says whether the
two probes and the two ControlNets are bit-identical. The demo's synthetic scenes are written into --work as
`make demo` writes them (innercontrol.synthetic: 640 scenes, seed 1). What the cache saves grows with the epochs a
run makes over its data (the first epoch encodes every row). Writes --out (default bench/LATENT_CACHE.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from innercontrol.demo import NUM_IMAGES, SCENES  # noqa: E402

DEFAULT_WORK, DEFAULT_OUT = Path("outputs/latent_cache_bench"), Path("bench/LATENT_CACHE.md")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mini.yaml", help="the training config (default: the miniature)")
    parser.add_argument("--steps", type=int, default=300, help="probe and ControlNet training steps per run")
    parser.add_argument("--cache", type=int, default=1024, help="optim.latent_cache of the cached runs (>= 1)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder (data, probes, ControlNets)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.cache < 1:
        parser.error("--steps and --cache must be at least 1")
    return args


def timed(command: list[str], log: Path) -> float:
    """Run the command (output to log) and return its wall time; a failure stops the benchmark, naming the log."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def same_files(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def main(argv=None) -> None:
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-m"]
    data = work / "synthetic"
    if not (data / "README.md").is_file():
        synthetic = ["innercontrol.synthetic", "--out", str(data), "--num", str(NUM_IMAGES["mini"])]
        synthetic += [arg for key, value in SCENES["mini"].items() for arg in (f"--{key}", str(value))]
        timed(python + synthetic, work / "synthetic.log")
    common = [
        "--config",
        args.config,
        f"data.dataset={data}",
        f"eval.dataset={data}",
        "logging.overwrite=true",
        "logging.checkpoint_every=100000",
    ]

    def probe_run(cache: int) -> float:
        name = f"probe_cache{cache}"
        overrides = [f"probe.path={work / name}", f"probe.output_dir={work / (name + '_run')}"]
        command = python + ["innercontrol.train_probes", *common, *overrides, f"probe.max_steps={args.steps}"]
        seconds = timed(command + [f"optim.latent_cache={cache}"], work / f"{name}.log")
        print(f"probe pretraining, optim.latent_cache={cache}: {seconds:.1f} s", flush=True)
        return seconds

    def train_run(cache: int) -> float:
        name = f"train_cache{cache}"
        overrides = [f"probe.path={work / 'probe_cache0'}", f"logging.output_dir={work / name}"]
        command = python + ["innercontrol.train", *common, *overrides, f"optim.max_steps={args.steps}"]
        command += ["logging.validation_every=0", f"optim.latent_cache={cache}"]
        seconds = timed(command, work / f"{name}.log")
        print(f"ControlNet training, optim.latent_cache={cache}: {seconds:.1f} s", flush=True)
        return seconds

    probe = {0: probe_run(0), args.cache: probe_run(args.cache)}
    train = {args.cache: train_run(args.cache), 0: train_run(0)}
    probes_equal = same_files(*(work / f"probe_cache{c}" / "probe.safetensors" for c in (0, args.cache)))
    weights = "controlnet/diffusion_pytorch_model.safetensors"
    controlnets_equal = same_files(*(work / f"train_cache{c}" / weights for c in (0, args.cache)))

    def row(stage: str, seconds: dict, equal: bool) -> str:
        off, on = seconds[0], seconds[args.cache]
        return f"| {stage} | {off:.1f} | {on:.1f} | {off - on:.1f} | {on / off:.2f} | {'yes' if equal else 'NO'} |"

    command = "python bench/latent_cache.py" + (f" --steps {args.steps}" if args.steps != 300 else "")
    command += f" --cache {args.cache}" if args.cache != 1024 else ""
    command += f" --config {args.config}" if args.config != "configs/mini.yaml" else ""
    lines = [
        "# optim.latent_cache: probe pretraining and ControlNet training with and without it",
        "",
        f"Made by `{command}` on {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs), config "
        f"`{args.config}`, {args.steps} steps per run. Wall time of each whole command (loading, steps, the probe's "
        "accuracy table, saving); both settings in one run, in alternating order.",
        "",
        f"| stage | encode every batch (s) | optim.latent_cache={args.cache} (s) | saved (s) | ratio | "
        "same weights, bit for bit |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        row("probe pretraining (`innercontrol.train_probes`)", probe, probes_equal),
        row("ControlNet training (`innercontrol.train`)", train, controlnets_equal),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not (probes_equal and controlnets_equal):
        raise SystemExit("the cache changed the trained weights: see the table")


if __name__ == "__main__":
    main()
