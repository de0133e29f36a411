"""Method comparison on the miniature (issue 15): plain ControlNet vs ControlNet++ vs alignment only vs InnerControl.

    python bench/method_comparison.py                                  # every arm, 3 seeds, CPU sizes (~1 h, 2 cores)
    python bench/method_comparison.py --arms innercontrol --seeds 0    # one arm, one seed
    python bench/method_comparison.py --preset gpu                     # more steps and seeds, for a GPU
    python bench/method_comparison.py --report-only                    # rewrite METHODS.md and plots from disk

Every arm trains a ControlNet with the real entry point (python -m innercontrol.train, configs/mini.yaml) from the
same initialisation, with the same seed, hence the same data order,
latent samples, timesteps and noise: only the objective differs (loss weights below; the probe and the condition
model are frozen and deterministic, so they draw no random numbers). Training runs in segments of --eval-every
steps (logging.resume=latest continues the same run; the learning-rate schedule is forced to constant_with_warmup,
whose value does not depend on optim.max_steps, so segments add up to one run); after each segment the ControlNet is evaluated with
python -m innercontrol.evaluate on the same held-out scenes, prompts and seeds (depth RMSE with the mini depth model,
CLIP score with the mini CLIP, FID on mini-CLIP features). The floor (the base with no ControlNet) is evaluated once;
the probe readout (the probe's error against the input control at each sampling step) runs on each arm's final
ControlNet and on the base alone.

The initialisation is a warm start, as in the paper (ControlNet++ and InnerControl fine-tune a working ControlNet
v1.1): --init-steps steps (default 300) of --init-arm's objective (default innercontrol, the demo's recipe; seed
1000, not one of the arms' seeds) from ControlNetModel.from_unet, evaluated like the arms (step 0 of every curve).
Measured on this miniature, a ControlNet trained from the UNet with the diffusion loss alone does not learn control
within 1200 steps (depth RMSE 0.96-1.01x the floor), so without a warm start arm (a) and (b) compare models that do
not work. --init-steps 0 starts every arm from the UNet instead.

Resumable: rerunning the command skips every finished segment and evaluation (an interrupted training segment
resumes from its last checkpoint). Outputs: --work (default outputs/method_comparison) holds the runs;
--out (default bench/) receives METHODS.md, method_curves.png and method_readout.png, made from what is on disk.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from innercontrol.demo import CONFIGS, MINIATURE, SCENES, check_miniature, path_overrides, run, shown  # noqa: E402

# (reward_weight, alignment_weight): only the objective differs between arms.
ARMS = {
    "plain": (0.0, 0.0),  # (a) diffusion loss only: ControlNet
    "reward": (0.5, 0.0),  # (b) + cycle-consistency reward in its window: ControlNet++
    "alignment": (0.0, 1.0),  # (c) + alignment loss over [0, 920] only
    "innercontrol": (0.5, 1.0),  # (d) + both: InnerControl
}
INIT_SEED = 1000  # the warm start's seed: none of the arms' seeds
LABELS = {
    "plain": "(a) plain",
    "reward": "(b) + reward",
    "alignment": "(c) + alignment",
    "innercontrol": "(d) both",
    "start": "warm start",
}
PRESETS = {
    # CPU sizes: a 300-step warm start, then 4 arms x 3 seeds x (300 steps + 4 evaluations of 48 prompts): 58 min
    # measured on 2 cores.
    "cpu": dict(
        init_steps=300, steps=300, eval_every=75, seeds=(0, 1, 2), eval_samples=48, readout_samples=8, num_images=640
    ),
    "gpu": dict(
        init_steps=2000,
        steps=2000,
        eval_every=250,
        seeds=(0, 1, 2, 3, 4),
        eval_samples=256,
        readout_samples=32,
        num_images=4000,
    ),  # fmt: skip
    # The machinery only (tests): a couple of steps on whatever model the config names.
    "smoke": dict(
        init_steps=1, steps=2, eval_every=1, seeds=(0,), eval_samples=2, readout_samples=2, num_images=24, probe_steps=4
    ),
}
METRICS = (("rmse", "depth RMSE", -1), ("clip_score", "CLIP score", 1), ("fid", "FID (mini-CLIP features)", -1))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="sizes (default cpu)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)} (default all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the preset's)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: preset's)")
    parser.add_argument(
        "--init-steps", type=int, default=None, help="warm-start steps before the arms (default: preset's; 0: none)"
    )
    parser.add_argument(
        "--init-arm", default="innercontrol", choices=sorted(ARMS), help="the warm start's objective (innercontrol)"
    )
    parser.add_argument("--model", default="mini", choices=sorted(CONFIGS), help="mini (default) or tiny (tests)")
    parser.add_argument("--miniature", default=str(MINIATURE), help="the miniature's folder (default checkpoints/mini)")
    parser.add_argument("--work", default="outputs/method_comparison", help="runs and evaluations (resumable)")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="where METHODS.md and the plots go")
    parser.add_argument(
        "--probe",
        default=None,
        help="an existing probe folder for the alignment arms and readouts (default: pretrain one)",
    )
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from what is on disk")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.arm_names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arm_names if a not in ARMS]
    if unknown or not args.arm_names:
        parser.error(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")] if args.seeds else list(preset["seeds"])
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got '{args.seeds}'")
    args.steps = args.steps or preset["steps"]
    args.init_steps = preset["init_steps"] if args.init_steps is None else args.init_steps
    if args.init_steps < 0:
        parser.error("--init-steps must be 0 or more")
    args.eval_every = args.eval_every or preset["eval_every"]
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Running: shared data and probe, then each (arm, seed) in evaluated segments.


def eval_points(steps: int, every: int) -> list[int]:
    return sorted({*range(every, steps + 1, every), steps})


def metrics_done(folder: Path, wanted: list[str]) -> bool:
    path = folder / "metrics.json"
    return path.is_file() and all(k in json.loads(path.read_text()) for k in wanted)


def trained_steps(run_dir: Path) -> int:
    path = run_dir / "summary.json"
    return json.loads(path.read_text())["steps"] if path.is_file() else 0


def init_spec(args) -> dict:
    """What every arm starts from: recorded in each run, so a run from another start is never continued."""
    return {"steps": args.init_steps, "arm": args.init_arm if args.init_steps else None, "seed": INIT_SEED}


def init_folder(work: Path, init: dict) -> Path:
    """The warm start's folder, named by what it is, so another --init-steps / --init-arm is another folder."""
    return work / f"init_{init['arm']}_{init['steps']}"


def check_same_start(run_dir: Path, init: dict) -> None:
    recorded = run_dir / "init.json"
    if recorded.is_file():
        found = json.loads(recorded.read_text())
    elif (run_dir / "checkpoints").is_dir() or trained_steps(run_dir):
        found = {"steps": 0, "arm": None, "seed": INIT_SEED}  # trained before warm starts existed: from the UNet
    else:
        found = init
    if found != init:
        raise SystemExit(
            f"error: {run_dir} started from {found}, this comparison starts from {init} (--init-steps / --init-arm); "
            f"delete {run_dir} (or pick another --work) to rerun it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(init))


def run_all(args) -> None:
    preset = PRESETS[args.preset]
    work = shown(Path(args.work))
    work.mkdir(parents=True, exist_ok=True)
    miniature = shown(Path(args.miniature))
    if args.model == "mini":
        check_miniature(miniature)
    else:
        if not (work / "tiny" / "model_index.json").is_file():
            run("tiny pipeline", ["innercontrol.tiny", "--out", str(work / "tiny")])
    common = ["--config", str(shown(CONFIGS[args.model])), *path_overrides(work, args.model, miniature)]
    probe = Path(args.probe) if args.probe else work / "probe"
    common += [f"eval.max_samples={preset['eval_samples']}", f"probe.path={probe}"]
    if args.model == "mini":  # 20 sampling steps, as the committed comparison was evaluated (the demo uses 10)
        common.append("eval.num_inference_steps=20")
    scenes = SCENES[args.model]
    if not (work / "synthetic" / "README.md").is_file():
        run("synthetic data", ["innercontrol.synthetic", "--out", str(work / "synthetic"),
                               "--num", str(preset["num_images"]), "--resolution", str(scenes["resolution"]),
                               "--supersample", str(scenes["supersample"]), "--seed", str(scenes["seed"])])  # fmt: skip
    if not (probe / "probe_config.json").is_file():
        run("probe pretraining (shared by the alignment arms)",
            ["innercontrol.train_probes", *common, f"probe.output_dir={work / 'probe_run'}", "logging.overwrite=true",
             "logging.checkpoint_every=100000",
             *([f"probe.max_steps={preset['probe_steps']}"] if preset.get("probe_steps") else [])])  # fmt: skip
    wanted = ["rmse", "clip_score", "fid"] if args.model == "mini" else ["rmse", "clip_score"]
    metric_arg = ",".join({"rmse": "control", "clip_score": "clip", "fid": "fid"}[m] for m in wanted)
    floor = work / "floor"
    if not metrics_done(floor, wanted):
        run("floor: the base alone", ["innercontrol.evaluate", *common, f"eval.output_dir={floor}",
                                      "--controlnet", "none", "--metrics", metric_arg])  # fmt: skip
    if not (work / "floor_readout" / "probe_readout.csv").is_file():
        run("probe readout of the base alone",
            ["innercontrol.evaluate", *common, f"eval.output_dir={work / 'floor_readout'}", "--controlnet", "none",
             "--probe", str(probe), "--probe-samples", str(preset["readout_samples"])])  # fmt: skip

    # The published objective's other settings, whatever configs/mini.yaml sets for the demo.
    run_settings = ["logging.resume=latest", "logging.validation_every=0", "logging.checkpoint_total_limit=1",
                    "logging.report_to=none", "optim.lr_schedule=constant_with_warmup",
                    "loss.diffusion_weighting=uniform", "loss.diffusion_weight=1",
                    "loss.corrective_fraction=0"]  # fmt: skip
    init = init_spec(args)
    start = []
    if init["steps"]:
        init_dir = init_folder(work, init)
        reward, alignment = ARMS[args.init_arm]
        if trained_steps(init_dir) < init["steps"]:
            run(f"warm start: {args.init_arm}, seed {INIT_SEED}, {init['steps']} steps",
                ["innercontrol.train", *common, *run_settings, f"seed={INIT_SEED}", f"loss.reward_weight={reward}",
                 f"loss.alignment_weight={alignment}", f"logging.output_dir={init_dir}",
                 f"logging.checkpoint_every={min(100, init['steps'])}", f"optim.max_steps={init['steps']}"])  # fmt: skip
        if trained_steps(init_dir) != init["steps"]:
            raise SystemExit(f"error: the warm start {init_dir} is at step {trained_steps(init_dir)}, not "
                             f"{init['steps']}; delete {init_dir} and {work / 'runs'} to redo it")  # fmt: skip
        if not metrics_done(init_dir / "eval", wanted):
            run("warm start: evaluate", ["innercontrol.evaluate", *common, f"eval.output_dir={init_dir / 'eval'}",
                                         "--controlnet", str(init_dir / "controlnet"), "--metrics", metric_arg])  # fmt: skip
        start = [f"model.controlnet={init_dir / 'controlnet'}"]

    points = eval_points(args.steps, args.eval_every)
    for seed in args.seed_list:
        for arm in args.arm_names:
            reward, alignment = ARMS[arm]
            run_dir = work / "runs" / f"{arm}_seed{seed}"
            check_same_start(run_dir, init)
            train_args = [*common, *run_settings, *start, f"seed={seed}", f"loss.reward_weight={reward}",
                          f"loss.alignment_weight={alignment}", f"logging.output_dir={run_dir}",
                          f"logging.checkpoint_every={args.eval_every}"]  # fmt: skip
            for step in points:
                eval_dir = run_dir / "eval" / f"step-{step:06d}"
                if metrics_done(eval_dir, wanted):
                    continue
                if trained_steps(run_dir) < step:
                    run(f"{arm}, seed {seed}: train to step {step}",
                        ["innercontrol.train", *train_args, f"optim.max_steps={step}"])  # fmt: skip
                if trained_steps(run_dir) != step:
                    raise SystemExit(
                        f"error: {run_dir} is at step {trained_steps(run_dir)}, past the evaluation at step {step} "
                        f"(its ControlNet is gone); delete {run_dir} to rerun that arm"
                    )
                run(f"{arm}, seed {seed}: evaluate step {step}",
                    ["innercontrol.evaluate", *common, f"eval.output_dir={eval_dir}",
                     "--controlnet", str(run_dir / "controlnet"), "--metrics", metric_arg])  # fmt: skip
            readout = run_dir / "readout"
            made_at = readout / "made_at_step.json"  # a readout of an earlier, shorter run is redone
            if (
                not (readout / "probe_readout.csv").is_file()
                or not made_at.is_file()
                or json.loads(made_at.read_text()) != trained_steps(run_dir)
            ):
                shutil.rmtree(readout, ignore_errors=True)
                run(f"{arm}, seed {seed}: probe readout",
                    ["innercontrol.evaluate", *common, f"eval.output_dir={readout}",
                     "--controlnet", str(run_dir / "controlnet"), "--probe", str(probe),
                     "--probe-samples", str(preset["readout_samples"])])  # fmt: skip
                made_at.write_text(json.dumps(trained_steps(run_dir)))


# ---------------------------------------------------------------------------------------------------------------
# Report: what is on disk, whatever ran.


def per_sample(folder: Path, metric: str) -> dict[int, float]:
    """Mean over the images of each prompt index of one per-sample metric."""
    values: dict[int, list[float]] = {}
    with (folder / "per_sample.csv").open() as f:
        for row in csv.DictReader(f):
            if row.get(metric) not in (None, ""):
                values.setdefault(int(row["index"]), []).append(float(row[metric]))
    return {i: sum(v) / len(v) for i, v in values.items()}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


def paired_interval(differences: list[float]) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its 95% t interval."""
    from scipy import stats

    n = len(differences)
    mean, sd = mean_sd(differences)
    return mean, (stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan"))


def collect(work: Path) -> dict:
    """{arm: {seed: {step: metrics}}} of every finished evaluation (control and CLIP score present) under work/runs."""
    found: dict = {}
    for eval_dir in sorted((work / "runs").glob("*_seed*/eval/step-*")):
        if not metrics_done(eval_dir, ["rmse", "clip_score"]) or not (eval_dir / "per_sample.csv").is_file():
            continue
        arm, seed = eval_dir.parents[1].name.rsplit("_seed", 1)
        step = int(eval_dir.name.split("-")[1])
        found.setdefault(arm, {}).setdefault(int(seed), {})[step] = json.loads((eval_dir / "metrics.json").read_text())
    return found


def final_step(runs: dict) -> int | None:
    """The last step evaluated in every (arm, seed): the comparison's common endpoint."""
    step_sets = [set(steps) for seeds in runs.values() for steps in seeds.values()]
    common = set.intersection(*step_sets) if step_sets else set()
    return max(common) if common else None


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean, sd = mean_sd(values)
    return f"{mean:.2f} +- {sd:.2f}" if not math.isnan(sd) else f"{mean:.2f}"


def write_report(args) -> str:
    work = Path(args.work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(work)
    end = final_step(runs)
    floor = (
        json.loads((work / "floor" / "metrics.json").read_text()) if (work / "floor" / "metrics.json").is_file() else {}
    )
    arms = [a for a in ARMS if a in runs]
    recorded = sorted((work / "runs").glob("*_seed*/init.json"))
    init = json.loads(recorded[0].read_text()) if recorded else init_spec(args)
    init_eval = init_folder(work, init) / "eval"
    has_start = init["steps"] and metrics_done(init_eval, ["rmse"])
    start = json.loads((init_eval / "metrics.json").read_text()) if has_start else {}
    origin = (
        f"a warm start ({init['steps']} steps of {LABELS[init['arm']]}'s objective from the UNet, seed {init['seed']})"
        if init["steps"]
        else "ControlNetModel.from_unet of the mini UNet"
    )
    command = " ".join(["python bench/method_comparison.py", *(args.argv or [])])
    made = json.loads((work / RUNS_MADE).read_text()) if (work / RUNS_MADE).is_file() else []
    lines = [
        "# Method comparison on the miniature",
        "",
        *[f"Runs made by `{m['command']}` on {m['machine']}, {m['date']}, {m['seconds'] / 60:.0f} min." for m in made],
        f"This report written by `{command}` on {machine()}, {time.strftime('%Y-%m-%d')}.",
        f"Model `{shown(Path(args.miniature)) if args.model == 'mini' else 'tiny random weights'}`; every arm starts "
        f"from the same ControlNet, {origin}, with the same seed, data order, timesteps and noise; only the "
        "objective differs. Evaluation: the same held-out scenes, prompts and seeds for every arm.",
        "",
    ]
    if not arms or end is None:
        lines.append("No finished evaluation yet.")
        text = "\n".join(lines) + "\n"
        (out / "METHODS.md").write_text(text)
        return text
    seeds = sorted({s for a in arms for s in runs[a]})
    lines += [
        f"Final step {end}; seeds {', '.join(map(str, seeds))}; mean +- std over seeds.",
        "",
        "| arm | " + " | ".join(label for _, label, _ in METRICS) + " |",
        "| --- |" + " ---: |" * len(METRICS),
        "| floor: base, no ControlNet | "
        + " | ".join("-" if floor.get(k) is None else f"{floor[k]:.2f}" for k, _, _ in METRICS)
        + " |",  # fmt: skip
    ]
    if start:
        lines.append("| warm start: every arm's step 0 | "
                     + " | ".join("-" if start.get(k) is None else f"{start[k]:.2f}" for k, _, _ in METRICS) + " |")  # fmt: skip
    for arm in arms:
        cells = [mean_std([runs[arm][s][end][k] for s in runs[arm] if end in runs[arm][s] and k in runs[arm][s][end]])
                 for k, _, _ in METRICS]  # fmt: skip
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    if floor.get("real_images_rmse") is not None:
        lines.append(f"| ceiling: real scenes | {floor['real_images_rmse']:.2f} | - | - |")
    verdicts = []  # (metric, arm, reference, verdict)
    for key, label, sign in METRICS[:2]:  # per-prompt metrics: depth RMSE (lower is better), CLIP score (higher)
        lines += ["", f"Paired per-prompt differences of {label} at the final step (arm minus reference; per prompt, "
                  "averaged over seeds; 95% t interval over prompts). An interval that contains 0 is a tie.", "",
                  "| arm | vs | mean difference | 95% interval | verdict |", "| --- | --- | ---: | --- | --- |"]  # fmt: skip
        for ref in ("plain", "reward", "start"):
            if ref not in arms and not (ref == "start" and start):
                continue
            for arm in [a for a in arms if a != ref]:
                per_prompt: dict[int, list[float]] = {}
                for s in [s for s in runs[arm] if ref == "start" or s in runs[ref]]:
                    a = per_sample(work / "runs" / f"{arm}_seed{s}" / "eval" / f"step-{end:06d}", key)
                    ref_dir = (
                        init_eval if ref == "start" else work / "runs" / f"{ref}_seed{s}" / "eval" / f"step-{end:06d}"
                    )
                    b = per_sample(ref_dir, key)
                    for i in a.keys() & b.keys():
                        per_prompt.setdefault(i, []).append(a[i] - b[i])
                diffs = [sum(v) / len(v) for v in per_prompt.values()]
                if not diffs:
                    continue
                mean, half = paired_interval(diffs)
                if math.isnan(half):
                    verdict = "one prompt: no interval"
                elif mean - half > 0 or mean + half < 0:  # outside the interval: better or worse by the sign
                    verdict = f"{LABELS[arm]} {'better' if (mean > 0) == (sign > 0) else 'worse'}"
                else:
                    verdict = "tie"
                verdicts.append((label, arm, ref, verdict))
                lines.append(f"| {LABELS[arm]} | {LABELS[ref]} | {mean:+.2f} | [{mean - half:+.2f}, "
                             f"{mean + half:+.2f}] | {verdict} |")  # fmt: skip
    lines += ["", "## What the numbers support", ""]
    lines += interpretation(runs, arms, end, floor, verdicts, len(seeds))
    if init["steps"]:
        lines.append(
            f"- The warm start was trained with {LABELS[init['arm']]}'s objective: the arms with that objective "
            "continue their own training, the others switch objective at step 0. A warm start trained with another "
            "objective (--init-arm) tests whether the ranking depends on it; a warm start trained with the diffusion "
            "loss alone, as the paper's ControlNet v1.1 was, does not learn the control on this miniature within "
            "1200 steps (README, demo section)."
        )
    curves, readout = plot_curves(runs, arms, floor, start, out), plot_readout(work, arms, out)
    lines += ["", f"Controllability vs training step: `{curves.name}`; probe readout across sampling steps: "
              f"`{readout.name if readout else '-'}`. The readout's probe is the one the alignment arms are trained "
              "against, so their lower readout error is partly by construction; the depth RMSE (a separate depth "
              "model on the decoded images) is the measure that does not favour them.", ""]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "METHODS.md").write_text(text)
    return text


def interpretation(runs, arms, end, floor, verdicts, num_seeds) -> list[str]:
    lines = []
    if floor.get("rmse") is not None:
        for arm in arms:
            values = [runs[arm][s][end]["rmse"] for s in runs[arm] if end in runs[arm][s]]
            worst = max(values)
            state = "below" if worst < floor["rmse"] else "NOT below"
            lines.append(f"- {LABELS[arm]}: every seed's depth RMSE ({', '.join(f'{v:.2f}' for v in values)}) is "
                         f"{state} the floor ({floor['rmse']:.2f}).")  # fmt: skip
    for metric in dict.fromkeys(m for m, _, _, _ in verdicts):
        mine = [(a, r, v) for m, a, r, v in verdicts if m == metric]
        better = [f"{LABELS[a]} over {LABELS[r]}" for a, r, v in mine if v.endswith("better")]
        worse = [f"{LABELS[a]} against {LABELS[r]}" for a, r, v in mine if v.endswith("worse")]
        ties = [f"{LABELS[a]} vs {LABELS[r]}" for a, r, v in mine if v == "tie"]
        if better:
            lines.append(f"- {metric}: better, outside the interval: " + "; ".join(better) + ".")
        if worse:
            lines.append(f"- {metric}: worse, outside the interval: " + "; ".join(worse) + ".")
        if ties:
            lines.append(f"- {metric}: ties (the interval contains 0): " + "; ".join(ties) + ".")
    lines.append(
        f"- {num_seeds} seed(s), one miniature, one condition (depth), one training length: the paired intervals "
        "cover prompt-to-prompt variation at this endpoint, not the variation across seeds or longer training; "
        "nothing here is a statement about SD1.5."
    )
    return lines


def plot_curves(runs, arms, floor, start, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label, _) in zip(axes, METRICS[:2]):
        for arm in arms:
            steps = sorted({step for s in runs[arm] for step in runs[arm][s]})
            means, sds = [], []
            for step in steps:
                values = [
                    runs[arm][s][step][key] for s in runs[arm] if step in runs[arm][s] and key in runs[arm][s][step]
                ]
                mean, sd = mean_sd(values)
                means.append(mean)
                sds.append(0.0 if math.isnan(sd) else sd)  # one seed: no band
            if start.get(key) is not None:  # step 0: the warm start every arm begins from
                steps, means, sds = [0, *steps], [start[key], *means], [0.0, *sds]
            ax.plot(steps, means, marker="o", label=LABELS[arm])
            ax.fill_between(steps, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)], alpha=0.15)
        if floor.get(key) is not None:
            ax.axhline(floor[key], color="gray", linestyle="--", label="floor (no ControlNet)")
        if key == "rmse" and floor.get("real_images_rmse") is not None:
            ax.axhline(floor["real_images_rmse"], color="black", linestyle=":", label="ceiling (real scenes)")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("controllability (mean +- std over seeds)")
    axes[1].set_title("text alignment")
    fig.tight_layout()
    path = out / "method_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_readout(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_readout(work: Path, arms, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    base = work / "floor_readout" / "probe_readout.csv"
    if base.is_file():
        curves["base alone"] = [read_readout(base)]
    for arm in arms:
        files = sorted((work / "runs").glob(f"{arm}_seed*/readout/probe_readout.csv"))
        if files:
            curves[LABELS[arm]] = [read_readout(f) for f in files]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    mean_map = None
    for name, tables in curves.items():
        steps = [row["timestep"] for row in tables[0]]
        values = [sum(t[k]["probe_mse"] for t in tables) / len(tables) for k in range(len(steps))]
        ax.plot(steps, values, marker="o", label=name, linestyle="--" if name == "base alone" else "-")
        mean_map = tables[0][0]["mean_map_mse"]
    if mean_map is not None:
        ax.axhline(mean_map, color="gray", linestyle=":", label="mean control map")
    ax.invert_xaxis()
    ax.set_xlabel("sampling timestep t (sampling order: left to right)")
    ax.set_ylabel("probe MSE against the input control")
    ax.set_title("when structure appears (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "method_readout.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


RUNS_MADE = "runs_made.json"  # in --work: which command ran there, on which machine, for how long


def machine() -> str:
    return f"{platform.machine()} ({os.cpu_count()} CPUs, {platform.system()})"


def main(argv=None) -> None:
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    start = time.time()
    if not args.report_only:
        run_all(args)
        record = Path(args.work) / RUNS_MADE
        made = json.loads(record.read_text()) if record.is_file() else []
        made.append({"command": " ".join(["python bench/method_comparison.py", *args.argv]), "machine": machine(),
                     "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - start)})  # fmt: skip
        record.write_text(json.dumps(made, indent=1))
    text = write_report(args)
    print(text)
    print(f"written: {Path(args.out) / 'METHODS.md'}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from innercontrol.cli import run_cli

    run_cli(main)
