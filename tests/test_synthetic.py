import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from innercontrol.config import DataConfig
from innercontrol.data import build_dataloader
from innercontrol.synthetic import BACKGROUNDS, COLOURS, SHAPES, render_scene, write_synthetic

RES = 48


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def test_same_seed_same_bytes(tmp_path):
    first = write_synthetic(tmp_path / "a", num=10, resolution=32, seed=3, val_fraction=0.2)
    second = write_synthetic(tmp_path / "b", num=10, resolution=32, seed=3, val_fraction=0.2)
    other = write_synthetic(tmp_path / "c", num=10, resolution=32, seed=4, val_fraction=0.2)
    files = sorted(p.relative_to(first) for p in first.rglob("*.parquet"))
    assert [str(f) for f in files] == [
        "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet",
    ]
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes()
        assert (first / f).read_bytes() != (other / f).read_bytes()


def test_depth_covers_near_and_far_and_matches_the_scene():
    for index in range(20):
        image, depth, caption = render_scene(index, RES, seed=0)
        assert image.shape == (RES, RES, 3) and image.dtype == np.uint8 and depth.shape == (RES, RES)
        assert depth.min() == 0.0 and 0.0 <= depth.max() <= 1.0
        assert (depth[0] == 0).all()  # the top row is the far wall
        assert depth[-1].max() > 0.9  # the bottom row is near ground
        ground = depth[:, 0]  # left column: ground depth grows towards the bottom (where no shape covers it)
        assert ground[-1] >= ground[RES // 2] >= ground[0]


def test_captions_name_the_visible_shapes_and_their_colours():
    words = set(COLOURS) | set(SHAPES) | set(BACKGROUNDS) | {"a", "an", "in", "front", "of", "on", "background"}
    for index in range(30):
        image, depth, caption = render_scene(index, RES, seed=1)
        assert set(caption.split()) <= words, caption
        named = re.findall(r"an? (\w+) (circle|square|triangle)", caption)
        assert 1 <= len(named) <= 3 and caption.endswith(" background")
        for colour, _ in named:
            # Shapes are the named colour up to jitter (+-20) and shading (+-10%): some pixels must be close to it.
            distance = np.abs(image.astype(int) - np.array(COLOURS[colour])).max(axis=2)
            assert (distance <= 50).sum() >= 4, (caption, colour)


def test_loads_through_the_front_end_with_both_splits(tmp_path):
    out = write_synthetic(tmp_path / "syn", num=20, resolution=RES, val_fraction=0.25)
    cfg = DataConfig(dataset=str(out), resolution=RES, num_workers=0)
    train = list(build_dataloader(cfg, 8, shuffle=False, infinite=False))
    validation = list(build_dataloader(cfg, 8, split="validation", shuffle=False, infinite=False))
    assert [len(b["caption"]) for b in train] == [8, 7] and [len(b["caption"]) for b in validation] == [5]
    control = torch.cat([b["control"] for b in train])
    assert control.min() == 0.0 and control.max() > 0.9  # near = bright, the wall = 0, as in MultiGen
    _, depth, caption = render_scene(0, RES, seed=0)  # row 0 of train is scene 0, stored as 8-bit PNG
    assert torch.equal(train[0]["control"][0, 0], torch.from_numpy(np.round(depth * 255) / 255).float())
    assert train[0]["caption"][0] == caption


def test_a_probe_learns_depth_better_than_the_mean_map():
    """The set is learnable: a tiny conv probe, trained briefly, beats predicting the mean depth map."""
    torch.manual_seed(0)

    def scenes(indices):
        images, depths = zip(*[render_scene(i, RES, seed=0)[:2] for i in indices])
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, torch.from_numpy(np.stack(depths)).float()[:, None]

    x_train, y_train = scenes(range(96))
    x_val, y_val = scenes(range(96, 128))
    mean_map = y_train.mean(0, keepdim=True)
    height = torch.linspace(-1, 1, RES).view(1, 1, RES, 1).expand(1, 1, RES, RES)
    probe = torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=4, dilation=4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 1, 1),
    )

    def predict(x):  # a residual on the mean map, so the probe starts from the baseline it must beat
        return mean_map + probe(torch.cat([x, height.expand(len(x), -1, -1, -1)], dim=1))

    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(60):
        batch = torch.randint(0, len(x_train), (16,))
        loss = torch.nn.functional.mse_loss(predict(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probe_mse = torch.nn.functional.mse_loss(predict(x_val), y_val).item()
    mean_mse = torch.nn.functional.mse_loss(mean_map.expand_as(y_val), y_val).item()
    assert probe_mse < 0.8 * mean_mse, (probe_mse, mean_mse)


def test_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "innercontrol.synthetic", "--out", str(tmp_path / "cli"), "--num", "6"]
        + ["--resolution", "32", "--seed", "2", "--val-fraction", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "data.dataset=" in result.stdout
    assert sorted(p.name for p in (tmp_path / "cli" / "data").iterdir()) == [
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    usage = subprocess.run([sys.executable, "-m", "innercontrol.synthetic", "--help"], capture_output=True, text=True)
    assert "--val-fraction" in usage.stdout and "python -m innercontrol.synthetic --out" in usage.stdout


def test_supersampled_scene_is_the_block_mean_of_the_larger_rendering_with_exact_depth():
    """supersample=k: image = k x k block means of the scene rendered at k times the size (antialiased), depth and
    caption those of the 1x scene (exact)."""
    from innercontrol.synthetic import render_scene

    image, depth, caption = render_scene(3, 32, seed=7, supersample=2)
    large, _, _ = render_scene(3, 64, seed=7)
    plain, plain_depth, plain_caption = render_scene(3, 32, seed=7)
    expected = np.round(large.astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(depth, plain_depth)
    assert caption == plain_caption
    assert not np.array_equal(image, plain)  # edges are blended, no longer hard


def test_written_set_can_be_supersampled_and_bad_arguments_are_named(tmp_path):
    """--supersample writes the antialiased scenes the miniature was trained on; bad arguments fail in one line."""
    from datasets import load_dataset

    write_synthetic(tmp_path / "ss", num=4, resolution=32, seed=5, val_fraction=0.25, supersample=2)
    rows = load_dataset("parquet", data_files=str(tmp_path / "ss" / "data" / "train-*.parquet"), split="train")
    for index in range(3):
        image, depth, caption = render_scene(index, 32, 5, supersample=2)
        assert np.array_equal(np.asarray(rows[index]["image"].convert("RGB")), image)
        assert np.array_equal(np.asarray(rows[index]["control_depth"]), np.round(depth * 255).astype(np.uint8))
        assert rows[index]["text"] == caption
    plain, _, _ = render_scene(0, 32, 5)
    assert not np.array_equal(np.asarray(rows[0]["image"].convert("RGB")), plain)
    assert "supersample 2" in (tmp_path / "ss" / "README.md").read_text()

    for bad in (["--supersample", "0"], ["--num", "0"], ["--val-fraction", "1.5"]):
        result = subprocess.run(
            [sys.executable, "-m", "innercontrol.synthetic", "--out", str(tmp_path / "bad"), *bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "need --num >= 1, --resolution >= 8, --supersample >= 1" in result.stderr
