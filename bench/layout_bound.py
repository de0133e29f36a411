"""How low can the control metric go with this base model? SDEdit the real eval images, their layout given.

    python bench/layout_bound.py --config configs/mini.yaml --eval-dir outputs/demo/eval \\
        --compare floor=outputs/demo/eval_floor --compare ControlNet=outputs/demo/eval   # the demo (~1 min a level)
    python bench/layout_bound.py --config configs/mini.yaml --eval-dir outputs/demo/eval --report-only

A ControlNet can only be as controllable as the base model's images allow: the control metric scores a generated
image with a condition model trained on real images. This measures that limit. For each noise level s
(--strengths), the base model alone (no ControlNet) runs image-to-image (SDEdit: diffusers' img2img pipeline) from
each real eval image noised to the timestep at fraction s of the schedule, with the evaluation's prompt, seed,
sampler, guidance and number of steps; the condition model then scores the image against the control as the
evaluation does (`innercontrol.evaluate.control_scores`). At s = 1 the real image is drowned in noise (about the
floor); at small s the layout and most details are given (about the ceiling, the real images' own score). The
level at which a ControlNet's score is matched tells up to which noise level its images hold the control's layout.

--eval-dir is a finished evaluation folder (`python -m innercontrol.evaluate`; its real/, controls/ and
eval_set.json are read); --compare LABEL=DIR draws other evaluations' scores as lines. Resumable: images and scores
on disk are kept (--work, default outputs/layout_bound; other settings there are refused). Writes --out (default
bench/): LAYOUT_BOUND.md and layout_bound.png. SD1.5-family base models; on CUDA when there is one (eval.mixed_precision).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from innercontrol import evaluate as ev  # noqa: E402
from innercontrol.config import ConfigError, load_config  # noqa: E402
from innercontrol.families import family_of  # noqa: E402
from innercontrol.fingerprint import changed_settings, normalized_path  # noqa: E402
from innercontrol.models import stable_diffusion_folder  # noqa: E402
from innercontrol.report import save_png, write_text  # noqa: E402

METRIC_NAMES = {
    "rmse": "depth RMSE, lower is better",
    "ms_ssim": "MS-SSIM, higher is better",
    "f1": "F1, higher is better",
}
DEFAULT_WORK, DEFAULT_OUT = Path("outputs/layout_bound"), Path("bench")
SAMPLER_NAMES = {"unipc": "UniPC", "euler_ancestral": "Euler ancestral"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the evaluation's config (its model, condition and eval.*)")
    parser.add_argument("--eval-dir", required=True, type=Path, help="a finished evaluation: real/, controls/")
    parser.add_argument(
        "--strengths",
        default="0.2,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
        help="img2img strengths (fractions of the sampling schedule; comma-separated, in (0, 1])",
    )
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR", help="an evaluation to compare")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="images and scores (resumable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where LAYOUT_BOUND.md and the plot go")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the scores on disk")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (as for innercontrol.evaluate)")
    return parser.parse_args(argv)


def strength_list(text: str, steps: int) -> list[float]:
    """The strengths, each of which runs at least one of the `steps` sampling steps (img2img runs int(steps * s))."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--strengths {text!r}: give comma-separated numbers in (0, 1], e.g. 0.4,0.6,1.0") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ConfigError(f"--strengths {text!r}: every strength must lie in (0, 1], e.g. 0.4,0.6,1.0")
    for value in values:
        if int(steps * value) < 1:
            raise ConfigError(
                f"--strengths: {value:g} runs no sampling step with eval.num_inference_steps={steps} (img2img runs "
                f"int(steps * strength)): use at least {1 / steps:g} or more steps"
            )
    return sorted(set(values))


def comparisons(pairs: list[str]) -> dict[str, Path]:
    found = {}
    for pair in pairs:
        label, sep, folder = pair.partition("=")
        if not sep or not label or not (Path(folder) / "metrics.json").is_file():
            raise ConfigError(f"--compare {pair!r}: give LABEL=DIR where DIR holds an evaluation's metrics.json")
        found[label] = Path(folder)
    return found


def first_timestep(pipe, steps: int, strength: float) -> int:
    """The timestep the img2img pipeline starts from (the real image is noised to it), as the pipeline chooses it."""
    pipe.scheduler.set_timesteps(steps, device="cpu")
    timesteps, _ = pipe.get_timesteps(steps, strength, "cpu")
    return int(timesteps[0])


def level_key(strength: float) -> str:
    return f"{strength:g}"


def level_folder(work: Path, strength: float) -> Path:
    return work / f"strength_{level_key(strength)}"


def load_img2img(cfg, device: torch.device):
    """The base model's img2img pipeline: the evaluation's base-alone pipeline (`evaluate.load_pipeline`: sampler,
    VAE, variant, dtype, device) with its components reused (SD1.5 family)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    folder = stable_diffusion_folder(cfg.model.pretrained_model)
    if family_of(folder).name != "sd15":
        raise ConfigError(f"bench/layout_bound.py runs SD1.5-family base models; {folder} is {family_of(folder).name}")
    base = ev.load_pipeline(cfg, ev.NO_CONTROLNET, device, ev.pipeline_dtype(cfg, device))
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def copy_folder(source: Path, target: Path) -> None:
    """Copy a folder whole or not at all (an interrupted copy is not taken for a finished one)."""
    if target.is_dir():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    partial.rename(target)


def generate_level(cfg, pipe, eval_dir: Path, folder: Path, samples: list[dict], strength: float) -> None:
    """The img2img images of one level, as evaluation folders hold them (images/group_0/{i}.png, controls/, real/),
    eval.batch_size per call, each from the evaluation's seed for that image."""
    from tqdm.auto import tqdm

    e = cfg.eval
    for part in ("controls", "real"):
        copy_folder(eval_dir / part, folder / part)
    todo = [i for i in range(len(samples)) if not ev.image_path(folder, 0, i).is_file()]
    for chunk in tqdm(ev.batches(todo, e.batch_size), desc=f"strength {strength:g}", unit="batch"):
        padded = chunk + [chunk[-1]] * (e.batch_size - len(chunk))  # every call the same shape, as evaluate does
        images = pipe(
            prompt=[samples[i]["caption"] for i in padded],
            image=ev.load_images([eval_dir / "real" / f"{i}.png" for i in padded]).to(pipe.device, pipe.dtype),
            strength=strength,
            negative_prompt=[e.negative_prompt] * len(padded),
            num_inference_steps=e.num_inference_steps,
            guidance_scale=e.guidance_scale,
            generator=[torch.Generator().manual_seed(ev.image_seed(e.seed, i, 0)) for i in padded],
            output_type="pil",
        ).images
        for i, image in zip(chunk, images):
            save_png(image, ev.image_path(folder, 0, i))


def score_level(cfg, condition, folder: Path, count: int, device: torch.device) -> dict:
    """Mean, median and per-image scores of a level's images, computed as the evaluation computes them."""
    values: dict[str, list[float]] = {}
    items = [(i, 0) for i in range(count)]
    for chunk in ev.batches(items, cfg.eval.batch_size):
        for name, scores in ev.control_scores(cfg, condition, folder, chunk, device).items():
            values.setdefault(name, []).extend(scores.tolist())
    return {
        name: {"mean": statistics.fmean(v), "median": statistics.median(v), "per_image": v}
        for name, v in values.items()
    }


def write_report(cfg, args, levels: list[dict], compare: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(iter(levels[0]["scores"]))
    digits = 2 if metric == "rmse" else 4
    rows = [
        f"| {lv['strength']:g} | {lv['first_timestep']} | {lv['scores'][metric]['mean']:.{digits}f} | "
        f"{lv['scores'][metric]['median']:.{digits}f} |"
        for lv in levels
    ]
    lines_at = {label: json.loads((folder / "metrics.json").read_text()) for label, folder in compare.items()}
    ceiling = json.loads((args.eval_dir / "metrics.json").read_text()).get(f"real_images_{metric}")
    other = [f"| {label} | {m[metric]:.{digits}f} |" for label, m in lines_at.items() if metric in m]
    if ceiling is not None:
        other.append(f"| ceiling (the real images) | {ceiling:.{digits}f} |")
    parts = ["python", "bench/layout_bound.py", "--config", str(args.config), "--eval-dir", str(args.eval_dir)]
    parts += ["--strengths", ",".join(f"{lv['strength']:g}" for lv in levels)]
    parts += [item for pair in args.compare for item in ("--compare", pair)]
    if args.work != DEFAULT_WORK:
        parts += ["--work", str(args.work)]
    if args.out != DEFAULT_OUT:
        parts += ["--out", str(args.out)]
    command = shlex.join(parts + list(args.overrides))
    sampler = SAMPLER_NAMES.get(ev.scheduler_name(cfg), ev.scheduler_name(cfg))
    text = [
        "# How far the control metric can go with this base model (SDEdit of the real eval images)",
        "",
        f"`{command}`",
        "",
        f"Base `{cfg.model.pretrained_model}` alone, img2img from each real eval image of `{args.eval_dir}` "
        f"({len(levels[0]['scores'][metric]['per_image'])} images, one per prompt) noised to the first timestep "
        f"below and denoised over the rest of a {cfg.eval.num_inference_steps}-step {sampler} schedule, guidance "
        f"{cfg.eval.guidance_scale:g}, the evaluation's prompts and seeds; scored against the controls as the "
        f"evaluation scores ({METRIC_NAMES.get(metric, metric)}). The evaluations below are their metrics.json "
        "means (over every image per prompt).",
        "",
        f"| strength | first timestep | {metric} (mean) | {metric} (median) |",
        "| ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"| evaluation | {metric} (mean) |",
        "| --- | ---: |",
        *other,
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "LAYOUT_BOUND.md", "\n".join(text))

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([lv["first_timestep"] for lv in levels], [lv["scores"][metric]["mean"] for lv in levels], "o-",
              label="SDEdit of the real image from t")  # fmt: skip
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"][1:]
    for colour, (label, m) in zip(colours, [(label, m) for label, m in lines_at.items() if metric in m]):
        axis.axhline(m[metric], linestyle="--", color=colour, label=label)
    if ceiling is not None:
        axis.axhline(ceiling, linestyle=":", color="grey", label="ceiling (real images)")
    axis.set_xlabel("first timestep of the image-to-image sampling (real image noised to t)")
    axis.set_ylabel(metric)
    axis.set_title("The base alone, from the real image noised to t")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out / "layout_bound.png", dpi=120)
    plt.close(figure)
    print("\n".join(text))


def run_settings(cfg, manifest: Path) -> dict:
    """What the scores depend on: the base model's generation settings (its weights by content), the eval set's
    manifest by content, the condition model."""
    settings = ev.generation_fingerprint(cfg, "none", ev.pipeline_dtype(cfg, device_for_run()))
    settings = {k: v for k, v in settings.items() if k not in ev.LOCATION_KEYS}
    return {
        **settings,
        "eval_set_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "condition": cfg.condition.name,
        "condition_eval_model": normalized_path(cfg.condition.eval_model),
    }


def device_for_run() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    strengths = strength_list(args.strengths, cfg.eval.num_inference_steps)
    compare = comparisons(args.compare)
    manifest = args.eval_dir / "eval_set.json"
    if not manifest.is_file() or not (args.eval_dir / "real").is_dir():
        raise ConfigError(
            f"--eval-dir {args.eval_dir} holds no finished evaluation (eval_set.json, real/): run "
            f"`python -m innercontrol.evaluate --config {args.config} --controlnet none eval.output_dir={args.eval_dir}` first"
        )
    samples = json.loads(manifest.read_text())["samples"]
    scores_file = args.work / "scores.json"
    done = json.loads(scores_file.read_text()) if scores_file.is_file() else {}
    levels = done.setdefault("levels", {})
    if args.report_only:
        if not levels:
            raise ConfigError(f"{args.work} holds no scores yet: run without --report-only first")
        write_report(cfg, args, sorted(levels.values(), key=lambda lv: lv["strength"]), compare)
        return

    settings = run_settings(cfg, manifest)
    made = levels or list(args.work.glob("strength_*"))
    if made and done.get("settings") is not None:
        changed = changed_settings(done["settings"], settings)
        if changed:
            raise ConfigError(f"{args.work} holds images of other settings ({'; '.join(changed)}); pass another --work")
    done["settings"] = settings
    args.work.mkdir(parents=True, exist_ok=True)
    write_text(scores_file, json.dumps(done, indent=1))  # the settings, before any image lands in --work

    from innercontrol.conditions import get_condition

    device = device_for_run()
    pipe = load_img2img(cfg, device)
    condition = get_condition(cfg.condition.name, cfg.condition.eval_model, device=device, purpose="eval")
    for strength in strengths:
        if level_key(strength) in levels:
            continue
        level = level_folder(args.work, strength)
        generate_level(cfg, pipe, args.eval_dir, level, samples, strength)
        first = first_timestep(pipe, cfg.eval.num_inference_steps, strength)
        scores = score_level(cfg, condition, level, len(samples), device)
        levels[level_key(strength)] = {"strength": strength, "first_timestep": first, "scores": scores}
        write_text(scores_file, json.dumps(done, indent=1))
    write_report(cfg, args, sorted(levels.values(), key=lambda lv: lv["strength"]), compare)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        sys.exit(f"error: {err}")
