import csv
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from innercontrol import evaluate as ev
from innercontrol.config import ConfigError, load_config
from innercontrol.report import LABEL_HEIGHT

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red square in front of a blue circle", "a cat"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_eval_set(folder: Path, num: int = 5, size: int = 96) -> Path:
    """A small local eval set in the hub parquet layout: image, control_depth (grayscale), text."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    images, depths = [], []
    for _ in range(num):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        ramp = np.linspace(0, 255, size)[:, None] * rng.uniform(0.5, 1.0) + rng.uniform(0, 60)
        depths.append(Image.fromarray(np.repeat(ramp.clip(0, 255), size, axis=1).astype(np.uint8), mode="L"))
    features = Features({"image": ImageFeature(), "control_depth": ImageFeature(), "text": Value("string")})
    data = Dataset.from_dict({"image": images, "control_depth": depths, "text": CAPTIONS[:num]}, features=features)
    (folder / "data").mkdir(parents=True)
    data.to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    return folder


def stand_in_data_module():
    """Until innercontrol/data.py exists: a minimal front end with its interface (ordered, finite, no dropout)."""

    def build_dataloader(data_cfg, batch_size, process_index=0, num_processes=1, seed=0, split=None, **_):
        from datasets import load_dataset

        files = sorted(str(p) for p in Path(data_cfg.dataset).glob(f"data/{split or data_cfg.split}-*.parquet"))
        rows = load_dataset("parquet", data_files=files, split="train")
        if data_cfg.max_samples:
            rows = rows.select(range(min(data_cfg.max_samples, len(rows))))
        size = (data_cfg.resolution, data_cfg.resolution)

        def tensor(img):
            array = np.asarray(img.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
            return torch.from_numpy(array).permute(2, 0, 1)

        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {
                "pixel_values": torch.stack([tensor(i) * 2 - 1 for i in chunk[data_cfg.image_column]]),
                "caption": list(chunk[data_cfg.caption_column]),
                "row_id": list(range(start, start + len(chunk[data_cfg.caption_column]))),
            }
            if data_cfg.control_column:
                batch["control"] = torch.stack([tensor(i) for i in chunk[data_cfg.control_column]])
            yield batch

    return types.SimpleNamespace(build_dataloader=build_dataloader)


@pytest.fixture
def data_front_end(monkeypatch):
    try:
        import innercontrol.data  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "innercontrol.data", stand_in_data_module())


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    return write_eval_set(tmp_path_factory.mktemp("evalset"))


def tiny_overrides(tiny_dir, eval_set, out, **extra):
    values = {
        "model.pretrained_model": tiny_dir,
        "condition.name": "depth",
        "condition.eval_model": tiny_dir / "dpt",
        "eval.dataset": eval_set,
        "eval.split": "validation",
        "eval.control_column": "control_depth",
        "eval.output_dir": out,
        "eval.resolution": 128,
        "eval.num_inference_steps": 2,
        "eval.images_per_prompt": 2,
        "eval.batch_size": 2,
        "eval.max_samples": 5,
        "eval.clip_model": tiny_dir / "clip",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def colour_statistics(batch):
    """Offline stand-in for Inception: per-channel mean and std of the 299x299 input."""
    batch = batch.float() / 255.0
    return torch.cat([batch.mean(dim=(2, 3)), batch.std(dim=(2, 3))], dim=1)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*.png"))}


def direct_image(pipe, cfg, out: Path, index: int, control: bool = True, **extra) -> np.ndarray:
    """The image a diffusers pipeline made here generates for eval sample `index`, group 0 (its prompt, its exported
    control unless control=False, its seed), in a batch of eval.batch_size as the evaluation runs it."""
    e = cfg.eval
    samples = json.loads((out / "eval_set.json").read_text())["samples"]
    if control:
        extra["image"] = ev.load_images([out / "controls" / f"{index}.png"]).repeat(e.batch_size, 1, 1, 1)
    return pipe(
        prompt=[samples[index]["caption"]] * e.batch_size,
        negative_prompt=[e.negative_prompt] * e.batch_size,
        num_inference_steps=e.num_inference_steps,
        guidance_scale=e.guidance_scale,
        height=e.resolution,
        width=e.resolution,
        generator=[torch.Generator().manual_seed(ev.image_seed(e.seed, index, 0)) for _ in range(e.batch_size)],
        output_type="np",
        **extra,
    ).images[0]


def reference_pipeline(pipeline_class, scheduler_class, folder: Path, **parts):
    """A diffusers pipeline made here from the tiny SD1.5 folder, with the evaluation's sampler (the reference that
    the evaluation's images are compared with)."""
    pipe = pipeline_class.from_pretrained(folder, **parts, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe


def assert_reference_image(pipe, cfg, out: Path, same: dict, other: dict) -> None:
    """Saved image 0 is the reference pipeline's image with the arguments `same` (to one pixel level) and visibly
    not its image with `other` (the setting under test changes the image)."""
    ours = saved_image(out, 0)
    assert np.abs(ours - direct_image(pipe, cfg, out, 0, **same)).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - direct_image(pipe, cfg, out, 0, **other)).mean() > 0.01


def saved_image(out: Path, index: int) -> np.ndarray:
    return np.asarray(Image.open(out / "images" / "group_0" / f"{index}.png"), dtype=np.float64) / 255


def test_image_seed_is_plain_arithmetic_and_distinct():
    seeds = {ev.image_seed(42, i, g) for i in range(300) for g in range(4)}
    assert len(seeds) == 1200
    assert ev.image_seed(42, 7, 3) == (42 * 1_000_003 + 7) * 1024 + 3


def test_help_lists_examples_and_metric_choices(capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "accelerate launch" in text and "configs/tiny.yaml" in text and "--probe" in text
    args = ev.parse_args(["--config", "c.yaml", "--metrics", "control,clip", "eval.guidance_scale=3.0"])
    assert args.metrics == ["control", "clip"] and args.overrides == ["eval.guidance_scale=3.0"]
    with pytest.raises(SystemExit):
        ev.parse_args(["--config", "c.yaml", "--metrics", "lpips"])


def test_evaluate_tiny_end_to_end_and_resume(tiny_dir, eval_set, tmp_path, data_front_end, capsys):
    from accelerate import Accelerator

    out = tmp_path / "eval"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(tiny_dir, eval_set, out))
    controlnet = str(tiny_dir / "controlnet")
    accelerator = Accelerator(cpu=True)
    results = ev.evaluate(cfg, controlnet, {"control", "clip", "fid"}, accelerator, colour_statistics)

    images = sorted((out / "images").rglob("*.png"))
    assert [p.relative_to(out).as_posix() for p in images] == [
        f"images/group_{g}/{i}.png" for g in range(2) for i in range(5)
    ]
    assert Image.open(images[0]).size == (128, 128)
    assert len(list((out / "real").glob("*.png"))) == 5 and len(list((out / "controls").glob("*.png"))) == 5
    for key in ("rmse", "rmse_per_group", "clip_score", "clip_score_per_group", "fid", "fid_per_group", "settings"):
        assert key in results
    assert results["num_samples"] == 5 and results["condition"] == "depth"
    assert 0 <= results["rmse"] <= 255 and results["clip_score"] >= 0 and results["fid"] > 0
    assert len(results["fid_per_group"]) == 2
    assert results["fid"] == pytest.approx(sum(results["fid_per_group"]) / 2)
    assert json.loads((out / "metrics.json").read_text())["rmse"] == pytest.approx(results["rmse"])
    with (out / "per_sample.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {"index", "group", "row_id", "rmse", "clip_score", "caption"} <= set(rows[0])
    assert np.mean([float(r["rmse"]) for r in rows]) == pytest.approx(results["rmse"], rel=1e-6)
    report = (out / "report.md").read_text()
    assert "| InnerControl (published) | 26.09 | 18.29 | 31.97 |" in report
    assert f"| ours (tiny random weights) | {results['rmse']:.2f} |" in report  # tiny_dir holds the tiny marker
    assert Image.open(out / "grid.png").size == (4 * 128, 4 * 128 + LABEL_HEIGHT)  # + the column labels
    assert len(list((out / "reextracted").glob("*.png"))) == 4

    # Resume: a second run generates nothing and rewrites no image; a CLIP-only run keeps the RMSE column.
    before = snapshot(out / "images")
    capsys.readouterr()
    again = ev.evaluate(cfg, controlnet, {"clip"}, accelerator)
    assert "generated 0 new images (10 were already on disk)" in capsys.readouterr().out
    assert snapshot(out / "images") == before
    assert again["rmse"] == pytest.approx(results["rmse"]) and again["clip_score"] == pytest.approx(
        results["clip_score"]
    )

    # Sharding: images generated process by process (index % 2) are byte-equal to the single-process ones.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(out / "eval_set.json", sharded)
    shutil.copytree(out / "controls", sharded / "controls")
    samples = json.loads((out / "eval_set.json").read_text())["samples"]
    pipe = ev.load_pipeline(cfg, controlnet, torch.device("cpu"), torch.float32)
    for rank in range(2):
        todo = ev.missing_images(cfg, sharded, [i for i in range(5) if i % 2 == rank])
        ev.generate(cfg, pipe, sharded, samples, todo, show_progress=False)
    assert {k: v[1] for k, v in snapshot(sharded / "images").items()} == {k: v[1] for k, v in before.items()}

    # Other generation settings in the same folder are refused rather than mixed in.
    changed = load_config(
        str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(tiny_dir, eval_set, out, **{"eval.guidance_scale": 3.0})
    )
    with pytest.raises(ConfigError, match="guidance_scale: 7.5 on disk, 3.0 now"):
        ev.evaluate(changed, controlnet, {"clip"}, accelerator)


def test_controls_computed_from_images_and_canny_f1(tiny_dir, eval_set, tmp_path, data_front_end):
    from accelerate import Accelerator

    out = tmp_path / "canny"
    overrides = tiny_overrides(
        tiny_dir,
        eval_set,
        out,
        **{
            "condition.name": "canny",
            "condition.eval_model": "null",
            "eval.control_column": "null",
            "eval.images_per_prompt": 1,
            "eval.max_samples": 2,
        },
    )
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides)
    results = ev.evaluate(cfg, str(tiny_dir / "controlnet"), {"control"}, Accelerator(cpu=True))
    assert 0.0 <= results["f1"] <= 1.0 and "clip_score" not in results and "fid" not in results
    # The saved controls are the canny condition of the exported real images.
    from innercontrol.conditions import get_condition

    real = ev.load_images([out / "real" / f"{i}.png" for i in range(2)])
    expected = get_condition("canny", purpose="eval")(real)
    saved = ev.load_images([out / "controls" / f"{i}.png" for i in range(2)])
    assert (saved - expected).abs().max() <= 0.5 / 255 + 1e-6
    assert "No published numbers for canny" in (out / "report.md").read_text()


def test_report_rows_follow_condition_and_guidance():
    cfg = load_config(None, ["condition.name=hed", "eval.guidance_scale=3.0"])
    results = {"ms_ssim": 0.81234, "ssim": 0.7, "fid": 12.5, "clip_score": 31.0, "num_samples": 5000}
    results["settings"] = {"controlnet": "c", "pretrained_model": "m"}
    report = ev.report_markdown(cfg, results)
    assert "| InnerControl (published) | 0.8305 | 12.16 | 31.28 |" in report
    assert "ControlNet++ (published)" not in report  # no ControlNet++ row at guidance 3.0
    assert "| **ours** | 0.8123 | 12.50 | 31.00 |" in report
    assert "MS-SSIM" in report and "single-scale SSIM: 0.7000" in report
    depth = ev.report_markdown(load_config(None, ["condition.name=depth"]), {**results, "rmse": 27.0})
    assert depth.count("(published)") == 7 and "| ControlNet++ (published) | 28.32 | 16.66 | 32.09 |" in depth
    assert (
        "| T2I-Adapter (SD1.5) (published) | 48.40 | - | - |" in depth
        and "| SDXL ControlNet (published) | 40.00 |" in depth
    )


def test_probe_readout_records_every_step(tiny_dir, eval_set, tmp_path, data_front_end):
    pytest.importorskip("innercontrol.probes")
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from innercontrol.controlled_unet import tapped_channels
    from innercontrol.probes import build_probe

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(0)
    probe = build_probe(tapped_channels(unet, "attn"), 32, unet.time_embedding.linear_2.out_features, tap="attn")
    probe.save_pretrained(tmp_path / "probe")
    out = tmp_path / "readout"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(tiny_dir, eval_set, out))
    cfg_steps = cfg.eval.num_inference_steps
    table = ev.probe_readout(cfg, str(tiny_dir / "controlnet"), str(tmp_path / "probe"), 3, Accelerator(cpu=True))
    assert [row["step"] for row in table] == list(range(cfg_steps))
    timesteps = [row["timestep"] for row in table]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == cfg_steps
    assert all(np.isfinite(row["probe_mse"]) and row["probe_mse"] > 0 for row in table)
    for name in ("probe_readout.csv", "probe_readout.md", "probe_readout.png"):
        assert (out / name).is_file()
    # Baseline: predicting the mean depth label of the 3 prompts for each of them (hand-computed from the controls).
    from innercontrol.conditions import get_condition

    condition = get_condition("depth", str(tiny_dir / "dpt"), purpose="eval")
    labels = condition.normalize_label(ev.load_images([out / "controls" / f"{i}.png" for i in range(3)]))
    expected = ((labels - labels.mean(0)) ** 2).mean().item()
    assert all(row["mean_map_mse"] == pytest.approx(expected, rel=1e-5) for row in table) and expected > 0

    # At another ControlNet conditioning scale the features (so the probe's error) change, and the heading says so.
    scaled = load_config(
        str(ROOT / "configs" / "tiny.yaml"),
        tiny_overrides(tiny_dir, eval_set, tmp_path / "scaled", **{"eval.controlnet_conditioning_scale": 2.0}),
    )
    table_scaled = ev.probe_readout(scaled, str(tiny_dir / "controlnet"), str(tmp_path / "probe"), 3)
    assert "ControlNet conditioning scale 2" in (tmp_path / "scaled" / "probe_readout.md").read_text()
    assert "conditioning scale" not in (out / "probe_readout.md").read_text()
    assert table_scaled[-1]["probe_mse"] != pytest.approx(table[-1]["probe_mse"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,kind", [("sd15", "controlnet"), ("sd15", "t2i_adapter"), ("sdxl", "controlnet"), ("sdxl", "t2i_adapter")]
)
def test_one_and_two_processes_give_identical_images(request, eval_set, tmp_path, family, kind):
    """The real entry points: `python -m innercontrol.evaluate` vs eval/eval_depth.sh with two CPU processes, for
    ControlNets and T2I-Adapters on SD1.5 and SDXL (issue 17)."""
    tiny_dir = request.getfixturevalue("tiny_dir" if family == "sd15" else "tiny_sdxl_dir")
    pytest.importorskip("innercontrol.data")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    fid_file = tmp_path / "inception.pt"
    from tests.test_metrics import FakeInception

    torch.jit.save(torch.jit.script(FakeInception()), str(fid_file))
    single, double = tmp_path / "one", tmp_path / "two"
    config = str(ROOT / "configs" / "tiny.yaml")
    controlnet = str(tiny_dir / ("controlnet" if kind == "controlnet" else "t2i_adapter"))
    extra = {"eval.model_kind": kind}
    one = [sys.executable, "-m", "innercontrol.evaluate", "--config", config, "--controlnet", controlnet]
    one += ["--metrics", "control", *tiny_overrides(tiny_dir, eval_set, single, **extra)]
    subprocess.run(one, cwd=ROOT, env=env, check=True, timeout=600)
    two = ["bash", "eval/eval_depth.sh", controlnet, *tiny_overrides(tiny_dir, eval_set, double, **extra)]
    two[3:3] = [f"eval.inception_weights={fid_file}"]
    done = subprocess.run(
        two,
        cwd=ROOT,
        env={**env, "NUM_PROCESSES": "2", "METRICS": "all", "MAIN_PORT": str(free_port())},
        timeout=600,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "generated 10 new images (0 were already on disk) on 2 process(es)" in done.stdout.decode()
    a, b = snapshot(single / "images"), snapshot(double / "images")
    assert len(a) == 10 and {k: v[1] for k, v in a.items()} == {k: v[1] for k, v in b.items()}
    results = json.loads((double / "metrics.json").read_text())
    assert results["rmse"] == pytest.approx(json.loads((single / "metrics.json").read_text())["rmse"], rel=1e-5)
    assert {"rmse", "clip_score", "fid", "fid_per_group"} <= set(results)
    # A second two-process run over the same folder generates nothing.
    again = subprocess.run(
        two,
        cwd=ROOT,
        env={**env, "NUM_PROCESSES": "2", "METRICS": "clip", "MAIN_PORT": str(free_port())},
        check=True,
        timeout=600,
        capture_output=True,
    )
    assert "generated 0 new images (10 were already on disk)" in again.stdout.decode()
    assert snapshot(double / "images") == b


def test_lineart_scores_include_the_published_uint8_ms_ssim(tmp_path):
    """For line art the evaluation also reports MS-SSIM computed the published way (uint8 inversion that wraps),
    next to ours (float); both against an independent torchmetrics computation. The report names both."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

    from innercontrol.conditions import get_condition

    from .test_conditions import load_spec, random_state_dict

    torch.save(random_state_dict(load_spec("lineart"), seed=3), tmp_path / "sk_model.pth")
    condition = get_condition("lineart", model_path=str(tmp_path / "sk_model.pth"), purpose="eval")
    rng = np.random.default_rng(0)
    out = tmp_path / "eval"
    for i in range(2):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        ev.save_png(Image.fromarray(coarse).resize((192, 192), Image.BICUBIC), ev.image_path(out, 0, i))
        control = torch.zeros(3, 192, 192)  # white lines (exactly 1) on black: the uint8 wrap turns them to ~0
        control[:, 8 * (i + 1) :: 24, :] = 1.0
        control[:, :, 5::16] = 1.0
        ev.save_png(ev.to_pil(control), out / "controls" / f"{i}.png")
    cfg = load_config(None, ["condition.name=lineart"])
    with torch.no_grad():
        scores = ev.control_scores(cfg, condition, out, [(0, 0), (1, 0)], torch.device("cpu"))
        pred = condition(ev.load_images([ev.image_path(out, 0, i) for i in range(2)]))
    label = ev.load_images([out / "controls" / f"{i}.png" for i in range(2)])

    def wrapped(x):  # numpy uint8 arithmetic, independently of metrics.published_lineart_map
        drawing = np.round((1 - x.numpy()) * 255).astype(np.uint8)
        return torch.from_numpy((np.uint8(1) - drawing).astype(np.float32) / 255)

    ours = tm_ms_ssim(pred, label, data_range=1.0, reduction="none")
    published = tm_ms_ssim(wrapped(pred), wrapped(label), data_range=1.0, reduction="none")
    torch.testing.assert_close(scores["ms_ssim"], ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores["ms_ssim_published_uint8"], published, atol=1e-5, rtol=1e-5)
    assert (scores["ms_ssim_published_uint8"] - scores["ms_ssim"]).abs().min() > 1e-2
    results = {"ms_ssim": 0.8, "ssim": 0.7, "ms_ssim_published_uint8": 0.7654, "num_samples": 2}
    report = ev.report_markdown(cfg, {**results, "settings": {"controlnet": "c", "pretrained_model": "m"}})
    assert "like for like with the published table: 0.7654" in report
    hed = ev.report_markdown(
        load_config(None, ["condition.name=hed"]), {**results, "settings": {"controlnet": "c", "pretrained_model": "m"}}
    )
    assert "loss.reward_weight=0" in hed


def small_config(tiny_dir, eval_set, out, **extra):
    """Two prompts, one image each: the fastest evaluation that still goes through every stage."""
    values = {"eval.images_per_prompt": 1, "eval.max_samples": 2, **extra}
    return load_config(str(ROOT / "configs" / "tiny.yaml"), tiny_overrides(tiny_dir, eval_set, out, **values))


def test_retrained_weights_in_the_same_folder_are_not_answered_with_old_images(
    tiny_dir, eval_set, tmp_path, data_front_end, capsys
):
    """Issue 13 item 3: the generation fingerprint is the weights' content hash, not the ControlNet's path."""
    from accelerate import Accelerator
    from diffusers import ControlNetModel

    net, original = tmp_path / "train" / "controlnet", tmp_path / "original"
    shutil.copytree(tiny_dir / "controlnet", net)
    shutil.copytree(net, original)
    cfg, accelerator = small_config(tiny_dir, eval_set, tmp_path / "eval"), Accelerator(cpu=True)
    ev.evaluate(cfg, str(net), {"control"}, accelerator)

    # "Retraining" into the same folder: one weight moves, so the images on disk are no longer its images.
    model = ControlNetModel.from_pretrained(net)
    with torch.no_grad():
        model.controlnet_cond_embedding.conv_in.bias.add_(0.1)
    model.save_pretrained(net)
    with pytest.raises(ConfigError, match="controlnet_sha256: '[0-9a-f]{64}' on disk, '[0-9a-f]{64}' now"):
        ev.evaluate(cfg, str(net), {"control"}, accelerator)

    # The original weights under another path: the images are theirs, so they are reused.
    capsys.readouterr()
    ev.evaluate(cfg, str(original), {"control"}, accelerator)
    assert "generated 0 new images (2 were already on disk)" in capsys.readouterr().out


def test_relative_and_absolute_spellings_are_the_same_setting(
    tiny_dir, eval_set, tmp_path, data_front_end, monkeypatch, capsys
):
    """Issue 13 item 4: paths are normalised before they are fingerprinted."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    out = tmp_path / "eval"
    ev.evaluate(small_config(tiny_dir, eval_set, out), str(tiny_dir / "controlnet"), {"control"}, accelerator)
    assert json.loads((out / "eval_set.json").read_text())["dataset"] == str(eval_set.resolve())

    monkeypatch.chdir(tmp_path)
    relative = small_config(tiny_dir, os.path.relpath(eval_set, tmp_path), "eval")
    capsys.readouterr()
    ev.evaluate(relative, os.path.relpath(tiny_dir / "controlnet", tmp_path), {"control"}, accelerator)
    assert "generated 0 new images (2 were already on disk)" in capsys.readouterr().out


def test_a_failed_evaluation_does_not_lock_its_folder(tiny_dir, eval_set, tmp_path, data_front_end):
    """Issue 13 item 5: generation.json is written only once the models have loaded."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    out = tmp_path / "eval"
    cfg = small_config(tiny_dir, eval_set, out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.evaluate(cfg, str(tmp_path / "does" / "not" / "exist"), {"control"}, accelerator)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError):
        ev.evaluate(cfg, str(tmp_path / "empty"), {"control"}, accelerator)
    assert not (out / "generation.json").exists()

    results = ev.evaluate(cfg, str(tiny_dir / "controlnet"), {"control"}, accelerator)
    assert 0 <= results["rmse"] <= 255 and len(list((out / "images" / "group_0").glob("*.png"))) == 2
    written = json.loads((out / "generation.json").read_text())
    assert written["controlnet"] == str((tiny_dir / "controlnet").resolve())


def test_a_failing_metric_keeps_the_others_and_fails_the_exit_code(tiny_dir, eval_set, tmp_path, data_front_end):
    """Issue 13 item 6: FID without its Inception weights fails; RMSE and CLIP score are still written."""
    from accelerate import Accelerator

    out = tmp_path / "eval"
    missing = tmp_path / "no-inception.pt"
    cfg = small_config(tiny_dir, eval_set, out, **{"eval.inception_weights": missing})
    accelerator = Accelerator(cpu=True)
    with pytest.raises(ev.MetricsFailed, match="fid: FileNotFoundError") as failure:
        ev.evaluate(cfg, str(tiny_dir / "controlnet"), {"control", "clip", "fid"}, accelerator)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rmse"] == pytest.approx(failure.value.results["rmse"]) and 0 <= saved["rmse"] <= 255
    assert saved["clip_score"] >= 0 and "fid" not in saved
    assert str(missing) in saved["errors"]["fid"] and set(saved["errors"]) == {"fid"}
    report = (out / "report.md").read_text()
    assert f" | {saved['rmse']:.2f} | - | {saved['clip_score']:.2f} |" in report  # our row: no FID
    assert "Failed metrics" in report and "- fid: FileNotFoundError" in report
    with (out / "per_sample.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2

    # The command line: the same failure exits with code 1 and one line, after writing the rest.
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--controlnet", str(tiny_dir / "controlnet")]
    argv += ["--metrics", "clip,fid", *tiny_overrides(tiny_dir, eval_set, out)]
    argv += ["eval.images_per_prompt=1", "eval.max_samples=2", f"eval.inception_weights={missing}"]
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv)
    assert str(exit_info.value.code).startswith("error: 1 metric(s) failed (fid: FileNotFoundError")

    # Fixed: FID is added, the error is cleared, the earlier metrics stay.
    fixed = ev.evaluate(cfg, str(tiny_dir / "controlnet"), {"fid"}, accelerator, colour_statistics)
    assert fixed["fid"] > 0 and "errors" not in fixed and fixed["rmse"] == pytest.approx(saved["rmse"])
    assert "errors" not in json.loads((out / "metrics.json").read_text())


def test_floor_without_controlnet_and_the_real_image_ceiling(tiny_dir, eval_set, tmp_path, data_front_end):
    """Issue 14: --controlnet none generates with the base alone (same prompts, seeds); the control metric also scores
    the real images against their own controls (the ceiling), checked against an independent computation."""
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    from innercontrol import metrics
    from innercontrol.conditions import get_condition

    out, accelerator = tmp_path / "floor", Accelerator(cpu=True)
    cfg = small_config(tiny_dir, eval_set, out)
    results = ev.evaluate(cfg, "none", {"control"}, accelerator)
    settings = json.loads((out / "generation.json").read_text())
    assert settings["controlnet"] == "none" and settings["controlnet_sha256"] == "none"
    assert settings["controlnet_conditioning_scale"] is None  # no ControlNet: the scale is not a setting of the floor

    # The floor's image 0 is the base pipeline's image for the same prompt and seed (no control input at all).
    pipe = reference_pipeline(StableDiffusionPipeline, UniPCMultistepScheduler, tiny_dir)
    assert np.abs(saved_image(out, 0) - direct_image(pipe, cfg, out, 0, control=False)).max() <= 1 / 255 + 1e-6

    # Ceiling: the depth model on the real eval images against the exported controls, computed here directly.
    depth = get_condition("depth", str(tiny_dir / "dpt"), purpose="eval")
    real = ev.load_images([out / "real" / f"{i}.png" for i in range(2)])
    controls = ev.load_images([out / "controls" / f"{i}.png" for i in range(2)])
    independent = metrics.depth_rmse(depth.predict_depth(real), controls).mean().item()
    assert results["real_images_rmse"] == pytest.approx(independent, rel=1e-5)
    assert results["real_images_rmse"] != pytest.approx(results["rmse"])  # the generated images score otherwise
    assert (
        "Ceiling: the real eval images scored against their own controls by the same evaluator: rmse "
        in (out / "report.md").read_text()
    )


def test_controlnet_conditioning_scale_is_the_pipelines_and_part_of_the_setting(
    tiny_dir, eval_set, tmp_path, data_front_end, capsys
):
    """eval.controlnet_conditioning_scale multiplies the ControlNet's residuals as diffusers' pipeline argument does;
    it is recorded, a folder made at another scale is refused, and a folder written before the option (no key) is
    read as the published 1.0."""
    from accelerate import Accelerator
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    out, accelerator, net = tmp_path / "scaled", Accelerator(cpu=True), tiny_dir / "controlnet"
    cfg = small_config(tiny_dir, eval_set, out, **{"eval.controlnet_conditioning_scale": 3.0})
    ev.evaluate(cfg, str(net), {"control"}, accelerator)
    assert json.loads((out / "generation.json").read_text())["controlnet_conditioning_scale"] == 3.0
    assert "ControlNet (conditioning scale 3) `" in (out / "report.md").read_text()

    controlnet = ControlNetModel.from_pretrained(net)
    pipe = reference_pipeline(
        StableDiffusionControlNetPipeline, UniPCMultistepScheduler, tiny_dir, controlnet=controlnet
    )
    assert_reference_image(
        pipe, cfg, out, {"controlnet_conditioning_scale": 3.0}, {"controlnet_conditioning_scale": 1.0}
    )

    default = small_config(tiny_dir, eval_set, out)
    assert default.eval.controlnet_conditioning_scale == 1.0
    with pytest.raises(ConfigError, match="controlnet_conditioning_scale: 3.0 on disk, 1.0 now"):
        ev.evaluate(default, str(net), {"control"}, accelerator)
    with pytest.raises(ConfigError, match="eval.controlnet_conditioning_scale"):
        small_config(tiny_dir, eval_set, out, **{"eval.controlnet_conditioning_scale": -1})

    # A folder from before the option: generated at 1.0, so the default reuses it.
    old = tmp_path / "old"
    ev.evaluate(small_config(tiny_dir, eval_set, old), str(net), {"control"}, accelerator)
    settings = json.loads((old / "generation.json").read_text())
    assert settings.pop("controlnet_conditioning_scale") == 1.0
    (old / "generation.json").write_text(json.dumps(settings))
    capsys.readouterr()
    ev.evaluate(small_config(tiny_dir, eval_set, old), str(net), {"control"}, accelerator)
    assert "generated 0 new images (2 were already on disk)" in capsys.readouterr().out

    # The floor takes no conditioning scale: it is named as ignored (the images are those of the default)
    floor = tmp_path / "floor"
    ev.evaluate(small_config(tiny_dir, eval_set, floor, **{"eval.controlnet_conditioning_scale": 2.0}), "none",
                {"control"}, accelerator)  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        "warning: eval.controlnet_conditioning_scale=2 is ignored: this evaluation runs the base model alone" in printed
    )
    assert json.loads((floor / "generation.json").read_text())["controlnet_conditioning_scale"] is None
    assert ev.unused_scales(small_config(tiny_dir, eval_set, floor), str(net)) == []
    adapter_scale_set = small_config(tiny_dir, eval_set, floor, **{"eval.adapter_conditioning_scale": 0.5})
    assert ev.unused_scales(adapter_scale_set, str(net)) == ["eval.adapter_conditioning_scale=0.5"]


def test_fid_on_clip_features_matches_the_clip_image_embeddings(tiny_dir, tmp_path):
    """eval.fid_features=clip: FID on eval.clip_model's image embeddings, against features computed independently."""
    from scipy import linalg
    from transformers import CLIPImageProcessor, CLIPModel

    from innercontrol import metrics

    rng = np.random.default_rng(3)
    folders = {}
    for name, shift in (("real", 0), ("fake", 60)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for k in range(40):  # more images than feature dimensions: full-rank covariances
            array = rng.integers(0, 196, (32, 32, 3)).astype(np.uint8) + shift
            Image.fromarray(array).save(folders[name] / f"{k}.png")
    extractor = metrics.clip_feature_extractor(str(tiny_dir / "clip"))
    value = metrics.fid(folders["real"], folders["fake"], feature_extractor=extractor)

    model = CLIPModel.from_pretrained(tiny_dir / "clip").eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_dir / "clip")
    size = model.config.vision_config.image_size

    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")  # clean-fid's own 299 px input, then CLIP's size and normalisation by hand

    def features(folder):
        images = []
        for path in sorted(folder.glob("*.png")):
            big = np.asarray(resize(np.asarray(Image.open(path).convert("RGB"))), dtype=np.float32)
            images.append(torch.from_numpy(big).permute(2, 0, 1))
        pixels = torch.nn.functional.interpolate(
            torch.stack(images) / 255, size=(size, size), mode="bicubic", antialias=True, align_corners=False
        )
        mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        with torch.no_grad():
            output = model.get_image_features(pixel_values=(pixels - mean) / std)
        return (output if isinstance(output, torch.Tensor) else output.pooler_output).double().numpy()

    a, b = features(folders["real"]), features(folders["fake"])
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    independent = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert value == pytest.approx(independent, rel=0.02, abs=1e-3)
    assert value > 0.01


def test_t2i_adapter_evaluation_with_the_published_settings(tiny_dir, eval_set, tmp_path, data_front_end):
    """Issue 17: eval.model_kind=t2i_adapter evaluates a T2I-Adapter through the same seeded generation; its image is
    the diffusers adapter pipeline's image (Euler ancestral, scale 1 for depth) for the same prompt, control and seed,
    and the adapter changes the image."""
    from accelerate import Accelerator
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionAdapterPipeline, T2IAdapter

    out, accelerator = tmp_path / "adapter", Accelerator(cpu=True)
    adapter_dir = tiny_dir / "t2i_adapter"
    cfg = small_config(tiny_dir, eval_set, out, **{"eval.model_kind": "t2i_adapter"})
    results = ev.evaluate(cfg, str(adapter_dir), {"control"}, accelerator)
    settings = json.loads((out / "generation.json").read_text())
    assert settings["model_kind"] == "t2i_adapter" and settings["scheduler"] == "euler_ancestral"
    assert settings["adapter_conditioning_scale"] == 1.0 and math.isfinite(results["rmse"])
    report = (out / "report.md").read_text()
    assert "T2I-Adapter (conditioning scale 1)" in report and "Euler ancestral steps" in report

    adapter = T2IAdapter.from_pretrained(adapter_dir)
    pipe = reference_pipeline(
        StableDiffusionAdapterPipeline, EulerAncestralDiscreteScheduler, tiny_dir, adapter=adapter
    )
    # without the adapter's features (scale 0) the image is another
    assert_reference_image(pipe, cfg, out, {"adapter_conditioning_scale": 1.0}, {"adapter_conditioning_scale": 0.0})

    # The published line-art setting, explicit overrides, and the readout's refusal.
    lineart = small_config(tiny_dir, eval_set, out, **{"eval.model_kind": "t2i_adapter", "condition.name": "lineart"})
    assert ev.adapter_scale(lineart) == 0.5 and ev.scheduler_name(lineart) == "euler_ancestral"
    explicit = small_config(
        tiny_dir, eval_set, out, **{"eval.adapter_conditioning_scale": 0.8, "eval.scheduler": "unipc"}
    )
    assert ev.adapter_scale(explicit) == 0.8 and ev.scheduler_name(explicit) == "unipc"
    assert ev.scheduler_name(small_config(tiny_dir, eval_set, out)) == "unipc"  # ControlNets: UniPC as before
    with pytest.raises(ConfigError, match="not on T2I-Adapters"):
        ev.probe_readout(cfg, str(adapter_dir), "unused", accelerator=accelerator)
    with pytest.raises(ConfigError, match="eval.model_kind"):
        small_config(tiny_dir, eval_set, out, **{"eval.model_kind": "adapter"})


@pytest.mark.parametrize("kind", ["controlnet", "t2i_adapter"])
def test_sdxl_controlnet_and_adapter_evaluation(tiny_sdxl_dir, eval_set, tmp_path, data_front_end, kind):
    """Issue 17: an SDXL base model (family read from model_index.json) evaluates through the SDXL pipelines; the image
    is the diffusers SDXL pipeline's image for the same prompt, control and seed; eval.vae replaces the VAE and is
    recorded by content."""
    import diffusers
    from accelerate import Accelerator

    out, accelerator = tmp_path / kind, Accelerator(cpu=True)
    net_dir = tiny_sdxl_dir / ("controlnet" if kind == "controlnet" else "t2i_adapter")
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_sdxl_dir / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.4  # another VAE: brighter images
    vae.save_pretrained(tmp_path / "vae")
    overrides = {"eval.model_kind": kind, "eval.vae": tmp_path / "vae"}
    cfg = small_config(tiny_sdxl_dir, eval_set, out, **overrides)
    results = ev.evaluate(cfg, str(net_dir), {"control"}, accelerator)
    settings = json.loads((out / "generation.json").read_text())
    assert settings["model_kind"] == kind and math.isfinite(results["rmse"])
    assert settings["vae_sha256"] == ev.content_digest(str(tmp_path / "vae"))

    if kind == "controlnet":
        pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
            tiny_sdxl_dir, controlnet=diffusers.ControlNetModel.from_pretrained(net_dir), add_watermarker=False
        )
        pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config)
        extra = {}
    else:
        pipe = diffusers.StableDiffusionXLAdapterPipeline.from_pretrained(
            tiny_sdxl_dir, adapter=diffusers.T2IAdapter.from_pretrained(net_dir)
        )
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        extra = {"adapter_conditioning_scale": 1.0}
    with_base_vae = direct_image(pipe, cfg, out, 1, **extra)
    pipe.vae = vae
    assert np.abs(saved_image(out, 1) - direct_image(pipe, cfg, out, 1, **extra)).max() <= 1 / 255 + 1e-6
    assert (saved_image(out, 1) - with_base_vae).mean() > 0.05  # eval.vae decoded it

    # The base alone on SDXL is the floor.
    floor = ev.evaluate(small_config(tiny_sdxl_dir, eval_set, tmp_path / "floor", **overrides), "none", {"control"})
    assert math.isfinite(floor["rmse"])
