import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from innercontrol.annotate import main
from innercontrol.conditions import get_condition


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 30)), ("b.jpg", (32, 32)), ("sub/c.webp", (24, 36))):
        pixels = (rng.random((size[1], size[0], 3)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(pixels).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image, not a candidate")
    return folder


def test_annotate_writes_maps_skips_corrupt_and_resumes(image_folder, tmp_path, capsys):
    out = tmp_path / "maps"
    argv = ["--condition", "canny", "--input", str(image_folder), "--output", str(out)]
    argv += ["--resolution", "32", "--batch-size", "2", "--device", "cpu"]
    first = main(argv)
    captured = capsys.readouterr()
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["a.png", "annotate.json", "b.png", "sub/c.png"]  # no temporary files left behind
    assert len(first.written) == 3 and first.already_done == []
    assert first.unreadable == [str(image_folder / "broken.png")]
    assert "broken.png" in captured.err and "wrote 3 maps" in captured.out

    # The saved map is the condition of the resized image, quantised to 8 bits.
    saved = np.asarray(Image.open(out / "a.png"))
    assert saved.shape == (32, 32)
    resized = Image.open(image_folder / "a.png").convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    image = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    expected = (get_condition("canny")(image)[0, 0] * 255).round().numpy()
    np.testing.assert_array_equal(saved, expected)

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    second = main(argv)
    assert second.written == [] and len(second.already_done) == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    assert "wrote 0 maps" in capsys.readouterr().out


def test_native_resolution_keeps_each_size(image_folder, tmp_path):
    out = tmp_path / "maps"
    main(["--condition", "canny", "--input", str(image_folder), "--output", str(out), "--resolution", "0"])
    assert Image.open(out / "a.png").size == (40, 30) and Image.open(out / "sub" / "c.png").size == (24, 36)


def test_help_has_an_example_and_folder_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "python -m innercontrol.annotate --condition" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--condition", "canny", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert "does not exist: pass a folder of images or a dataset" in capsys.readouterr().err


def test_model_flag_reaches_the_condition(image_folder, tmp_path):
    spec = json.loads((Path(__file__).resolve().parent / "specs" / "lineart.json").read_text())
    checkpoint = tmp_path / "sk_model.pth"
    torch.save({key: 0.01 * torch.randn(shape) for key, shape in spec["state_dict"].items()}, checkpoint)
    out = tmp_path / "lineart"
    argv = ["--condition", "lineart", "--model", str(checkpoint), "--input", str(image_folder), "--output", str(out)]
    result = main([*argv, "--resolution", "32", "--device", "cpu"])
    assert len(result.written) == 3 and Image.open(out / "b.png").mode == "L"


def test_dataset_input_writes_one_map_per_row_and_resumes(tmp_path):
    from innercontrol.annotate import main
    from innercontrol.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "synthetic", num=6, resolution=32, seed=0, val_fraction=0.0)
    args = ["--condition", "canny", "--input", str(data), "--output", str(tmp_path / "maps"), "--resolution", "32"]
    first = main(args + ["--batch-size", "4", "--device", "cpu"])
    assert sorted(Path(p).name for p in first.written) == [f"{i}.png" for i in range(6)]
    second = main(args + ["--batch-size", "4", "--device", "cpu"])
    assert second.written == [] and len(second.already_done) == 6


def test_a_different_request_is_never_answered_with_old_maps(image_folder, tmp_path, capsys):
    """Issue 13 item 7: the maps' folder records what made them; another resolution or split is refused."""
    from innercontrol.synthetic import write_synthetic

    out = tmp_path / "maps"
    argv = ["--condition", "canny", "--input", str(image_folder), "--output", str(out), "--device", "cpu"]
    main([*argv, "--resolution", "32"])
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    with pytest.raises(SystemExit):
        main([*argv, "--resolution", "16"])
    assert "resolution: 32 there, 16 now" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before and Image.open(out / "a.png").size == (32, 32)

    # A dataset: validation maps are not answered with the train maps already in the folder.
    data = write_synthetic(tmp_path / "synthetic", num=8, resolution=32, seed=0, val_fraction=0.5)
    rows = ["--condition", "canny", "--input", str(data), "--output", str(tmp_path / "rows"), "--resolution", "32"]
    assert len(main([*rows, "--split", "train"]).written) == 4
    with pytest.raises(SystemExit):
        main([*rows, "--split", "validation"])
    assert "split: 'train' there, 'validation' now" in capsys.readouterr().err

    # Maps of unknown origin (no record) are not taken for this request's either.
    (tmp_path / "old").mkdir()
    shutil.copy(out / "a.png", tmp_path / "old" / "a.png")
    with pytest.raises(SystemExit):
        main(["--condition", "canny", "--input", str(image_folder), "--output", str(tmp_path / "old")])
    assert "holds 1 PNG file(s)" in capsys.readouterr().err


def test_offline_hint_names_the_model_flag(image_folder, tmp_path, monkeypatch, capsys):
    """Issue 13 item 7: without weights offline, the advice is this command's --model, not a config key."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--condition", "hed", "--input", str(image_folder), "--output", str(tmp_path / "maps")])
    message = str(exit_info.value.code)
    assert "pass --model DIR/ControlNetHED.pth" in message and "condition.reward_model" not in message
    assert not (tmp_path / "maps").exists()  # nothing claimed by a command that could not load its model
