"""The demo's summary on the miniature: floor, ControlNet and ceiling side by side, from the evaluation folders."""

import json

from PIL import Image

from innercontrol import demo
from innercontrol.report import GRID_ROWS, LABEL_HEIGHT


def fake_eval(folder, metrics, size=64):
    for sub in ("controls", "real", "reextracted", "images/group_0"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(5):
        for sub in ("controls", "real", "reextracted", "images/group_0"):
            Image.new("RGB", (size, size), (i * 40, 10, 200)).save(folder / sub / f"{i}.png")
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_summary_sets_floor_controlnet_and_ceiling_side_by_side(tmp_path):
    fake_eval(tmp_path / "eval_floor", {"rmse": 80.0, "clip_score": 70.0, "fid": 3.0, "num_samples": 5})
    trained = {"rmse": 30.0, "clip_score": 72.5, "fid": 2.0, "real_images_rmse": 9.5, "num_samples": 5}
    fake_eval(tmp_path / "eval", trained)
    text = demo.write_summary(tmp_path, tmp_path / "mini")
    assert "| depth RMSE vs the control (lower is better) | 80.00 | 30.00 | 9.50 |" in text
    assert "| CLIP score, mini CLIP (higher is better) | 70.00 | 72.50 | - |" in text
    assert "ControlNet depth RMSE / floor: 0.375" in text
    assert (tmp_path / "summary.md").read_text() == text
    grid = Image.open(tmp_path / "summary_grid.png")
    assert grid.size == (6 * 3 * 64, LABEL_HEIGHT + min(GRID_ROWS, 5) * 3 * 64)
    # Column 4 (the ControlNet's image) of row 1 is that image, upscaled 3x.
    assert grid.getpixel((3 * 192 + 5, LABEL_HEIGHT + 192 + 5)) == (40, 10, 200)


def test_demo_refuses_a_missing_miniature_with_the_fix(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        demo.main(["--out", str(tmp_path / "out"), "--miniature", str(tmp_path / "nowhere")])
    message = str(err.value)
    assert (
        "lacks unet, vae, text_encoder, tokenizer, scheduler, dpt, clip" in message
        and "git checkout -- checkpoints/mini" in message
    )
