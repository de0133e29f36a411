import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from innercontrol.config import DataConfig, EvalConfig
from innercontrol.data import DataError, build_dataloader, to_rgb
from innercontrol.hub import HubUnreachableError
from innercontrol.synthetic import write_synthetic
from tests.data_sources import (
    as_dataset,
    make_rows,
    read_rows,
    write_imagefolder,
    write_parquet_folder,
    write_save_to_disk,
)

RES = 32


@pytest.fixture(autouse=True)
def _datasets_sandbox(tmp_path_factory, monkeypatch):
    # Arrow caches of the local datasets go to a temporary folder, not ~/.cache; and datasets' 5 s sleep after a
    # shuffled stream of interleaved shards (an arrow workaround) would dominate these tiny tests.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def rows():
    return make_rows(13)  # 10 train + 3 validation


@pytest.fixture(scope="module")
def sources(tmp_path_factory, rows):
    """The same train/validation rows in every local format."""
    root = tmp_path_factory.mktemp("sources")
    splits = {"train": rows[:10], "validation": rows[10:]}
    as_dataset(rows[:10]).to_parquet(str(root / "train.parquet"))
    return {
        "parquet file": root / "train.parquet",
        "parquet folder": write_parquet_folder(root / "parquet", splits),
        "imagefolder": write_imagefolder(root / "imagefolder", splits),
        "save_to_disk": write_save_to_disk(root / "saved", splits),
    }


def config(dataset, **overrides) -> DataConfig:
    values = dict(dataset=str(dataset), resolution=RES, num_workers=0, shuffle_buffer=8)
    values.update(overrides)
    return DataConfig(**values)


def one_pass(cfg, batch_size=4, **kwargs) -> list[dict]:
    kwargs.setdefault("shuffle", False)
    return list(build_dataloader(cfg, batch_size, infinite=False, **kwargs))


def assert_same_batches(got: list[dict], expected: list[dict], ids: bool = False) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert ("control" in a) == ("control" in b)
        if "control" in a:
            assert torch.equal(a["control"], b["control"])
        assert a["caption"] == b["caption"]
        if ids:
            assert a["row_id"] == b["row_id"]


def content_id(png_bytes: bytes) -> str:
    return "sha1:" + hashlib.sha1(png_bytes).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Sources and transforms


def test_every_local_source_gives_the_same_batches(sources, rows):
    reference = one_pass(config(sources["parquet file"]))
    assert [len(b["caption"]) for b in reference] == [4, 4, 2]
    assert [c for b in reference for c in b["caption"]] == [f"caption {i}" for i in range(10)]
    assert [i for b in reference for i in b["row_id"]] == list(range(10))
    for name, path in sources.items():
        for streaming in (False, True):
            assert_same_batches(one_pass(config(path, streaming=streaming)), reference)
        if name != "parquet file":
            validation = one_pass(config(path, split="validation"))
            assert validation[0]["caption"] == ["caption 10", "caption 11", "caption 12"]

    # The transforms, against PIL by hand: bicubic resize, image to [-1, 1], control to [0, 1], 3 channels.
    first = reference[0]
    assert first["pixel_values"].shape == (4, 3, RES, RES) and first["control"].shape == (4, 3, RES, RES)
    assert first["pixel_values"].dtype == torch.float32
    rgb = Image.open(io.BytesIO(rows[0]["image"])).resize((RES, RES), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(first["pixel_values"][0], expected)
    gray = Image.open(io.BytesIO(rows[0]["control_depth"])).resize((RES, RES), Image.Resampling.BICUBIC)
    assert torch.equal(first["control"][0], torch.from_numpy(np.array(gray)).float().div(255).expand(3, -1, -1))
    rgba_top = first["pixel_values"][1, :, 0]  # row 1 is RGBA with transparent top rows: white
    assert torch.equal(rgba_top, torch.ones_like(rgba_top))
    grayscale = first["pixel_values"][2]  # row 2 is mode L: three equal channels
    assert torch.equal(grayscale[0], grayscale[1]) and torch.equal(grayscale[1], grayscale[2])
    assert -1 <= first["pixel_values"].min() < -0.9 and 0.9 < first["pixel_values"].max() <= 1
    assert 0 <= first["control"].min() < 0.1 and 0.9 < first["control"].max() <= 1


def test_synthetic_set_loads_the_same_as_imagefolder_and_save_to_disk(tmp_path):
    synthetic = write_synthetic(tmp_path / "synthetic", num=12, resolution=RES, val_fraction=0.25, rows_per_file=5)
    splits = {split: read_rows(synthetic, split) for split in ("train", "validation")}
    assert [len(splits["train"]), len(splits["validation"])] == [9, 3]
    others = [write_imagefolder(tmp_path / "if", splits), write_save_to_disk(tmp_path / "saved", splits)]
    for split in ("train", "validation"):
        reference = one_pass(config(synthetic, split=split))
        assert [c for b in reference for c in b["caption"]] == [r["text"] for r in splits[split]]
        assert_same_batches(one_pass(config(synthetic, split=split, streaming=True)), reference)
        for other in others:
            assert_same_batches(one_pass(config(other, split=split)), reference)


def test_max_samples_no_control_and_eval_config(sources):
    batches = one_pass(config(sources["parquet folder"], max_samples=5, control_column=None), batch_size=8)
    assert len(batches) == 1 and "control" not in batches[0]
    assert batches[0]["row_id"] == [0, 1, 2, 3, 4]
    streamed = one_pass(config(sources["parquet folder"], max_samples=5, streaming=True), batch_size=8)
    assert streamed[0]["caption"] == [f"caption {i}" for i in range(5)]
    # Evaluation reads with its own config section (no dropout, no workers, split validation).
    eval_cfg = EvalConfig(dataset=str(sources["save_to_disk"]), resolution=RES, max_samples=2)
    batches = one_pass(eval_cfg, config_key="eval")
    assert batches[0]["caption"] == ["caption 10", "caption 11"] and batches[0]["control"].shape[0] == 2


def test_sizes_and_indexing(sources, rows):
    loader = build_dataloader(config(sources["imagefolder"]), 4, process_index=1, num_processes=3, infinite=False)
    assert loader.dataset.num_rows == 3 and len(loader.dataset) == 3 and loader.batches_per_epoch == 1
    assert build_dataloader(config(sources["imagefolder"]), 4).batches_per_epoch == 2  # endless: full batches only
    sample = loader.dataset[4]  # a row of the dataset, decoded
    assert (sample.row_id, sample.caption, sample.error) == (4, "caption 4", None)
    assert sample.image.shape == sample.control.shape == (RES, RES, 3)
    streamed = build_dataloader(config(sources["imagefolder"], streaming=True), 4)
    assert streamed.dataset.num_rows is None and streamed.batches_per_epoch is None
    row_ids = next(iter(streamed))["row_id"]  # a streamed imagefolder row is named by its file
    assert all(isinstance(i, str) and i.endswith(".png") for i in row_ids)


def test_to_rgb_scales_16_bit_depth():
    depth16 = Image.fromarray(np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16))
    assert depth16.mode.startswith("I")
    rgb = np.asarray(to_rgb(depth16))
    assert rgb.shape == (2, 2, 3) and rgb[..., 0].tolist() == [[0, 255], [100, 200]]
    palette = Image.fromarray(np.zeros((2, 2, 3), np.uint8)).quantize(4)
    assert to_rgb(palette).mode == "RGB"


# ----------------------------------------------------------------------------------------------------------------------
# Sharding, order, resume


def test_two_processes_read_disjoint_shards_that_cover_the_dataset(tmp_path):
    rows = make_rows(11, size=(16, 16))
    # 2 files: each streamed process reads whole files; 3 files: each keeps every 2nd row of the stream.
    names = [str(write_parquet_folder(tmp_path / f"files{n}", {"train": rows}, files_per_split=n)) for n in (2, 3)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf_cache")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    worker = Path(__file__).parent / "data_shard_worker.py"
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(tmp_path / f"seen{i}.json"), str(i), "2", *names], env=env)
        for i in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    seen = [json.loads((tmp_path / f"seen{i}.json").read_text()) for i in range(2)]
    all_captions = sorted(r["text"] for r in rows)
    for key in seen[0]:
        ids = [[row_id for row_id, _ in seen[i][key]] for i in range(2)]
        assert len(ids[0]) + len(ids[1]) == 11 and min(len(ids[0]), len(ids[1])) >= 4, key
        assert not set(ids[0]) & set(ids[1]), key  # disjoint
        expected = set(range(11)) if "streaming=False" in key else {content_id(r["image"]) for r in rows}
        assert set(ids[0]) | set(ids[1]) == expected, key  # together, the whole dataset
        assert sorted(caption for i in range(2) for _, caption in seen[i][key]) == all_captions, key


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_gives_the_batches_of_an_uninterrupted_run(tmp_path, streaming):
    rows = make_rows(14, size=(16, 16))
    rows[6]["image"] = rows[6]["image"][:60]  # a truncated row: resume must count and skip it the same way
    path = write_parquet_folder(tmp_path / "data", {"train": rows})
    cfg = config(path, streaming=streaming, caption_dropout=0.5, max_bad_fraction=0.2)
    first, more = 5, 4  # 13 good rows make 4 batches of 3 per epoch: stop inside epoch 1, go on into epoch 2

    def loader():
        return build_dataloader(cfg, 3, seed=3)

    uninterrupted = loader()
    batches = [batch for _, batch in zip(range(first + more), uninterrupted)]
    interrupted = loader()
    for _, _ in zip(range(first), interrupted):
        pass
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = loader()
    resumed.load_state_dict(state)
    assert_same_batches([batch for _, batch in zip(range(more), resumed)], batches[first:], ids=True)
    assert resumed.stats == uninterrupted.stats
    bad_id = content_id(rows[6]["image"]) if streaming else 6
    assert resumed.stats.rows_read >= 2 * 14 and resumed.stats.bad_rows >= 2 and resumed.stats.bad_row_ids == [bad_id]

    captions = [c for b in batches for c in b["caption"]]
    assert 0 < captions.count("") < len(captions)  # dropout happened, to some captions
    epoch0 = [i for b in batches[:4] for i in b["row_id"]]
    epoch1 = [i for b in batches[4:8] for i in b["row_id"]]
    assert len(set(epoch0)) == 12 and epoch0 != epoch1  # each epoch re-shuffles


def test_decode_workers_do_not_change_the_batches(sources):
    cfg = config(sources["parquet folder"], caption_dropout=0.3)
    inline = one_pass(cfg, batch_size=3, shuffle=True, seed=1)
    assert_same_batches(one_pass(cfg, batch_size=3, shuffle=True, seed=1, num_workers=2), inline, ids=True)


def test_state_from_another_process_layout_is_refused(sources):
    cfg = config(sources["parquet folder"])
    state = build_dataloader(cfg, 2, process_index=0, num_processes=2).state_dict()
    with pytest.raises(DataError, match=r"saved with num_processes=2 but this loader has num_processes=1"):
        build_dataloader(cfg, 2).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------------
# Bad data


def with_bad_rows(num: int, bad: list[int]) -> list[dict]:
    rows = make_rows(num, size=(16, 16))
    for i in bad:
        rows[i]["image"] = rows[i]["image"][: len(rows[i]["image"]) // 2]  # truncated PNG
    return rows


def test_truncated_row_is_skipped_counted_and_logged(tmp_path, caplog):
    path = write_parquet_folder(tmp_path / "data", {"train": with_bad_rows(10, [3])})
    loader = build_dataloader(config(path, max_bad_fraction=0.2), 4, shuffle=False, infinite=False)
    with caplog.at_level("WARNING", logger="innercontrol.data"):
        seen = [i for batch in loader for i in batch["row_id"]]
    assert seen == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert (loader.stats.rows_read, loader.stats.bad_rows, loader.stats.bad_row_ids) == (10, 1, [3])
    assert "row 3" in loader.stats.first_error
    assert any("skipped bad row 3 of dataset" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_too_many_bad_rows_stop_the_run_with_their_ids(tmp_path):
    small = write_parquet_folder(tmp_path / "small", {"train": with_bad_rows(10, [2, 5, 7])})
    loader = build_dataloader(config(small, max_bad_fraction=0.1), 4, shuffle=False, infinite=False)
    with pytest.raises(DataError, match=r"3 of 10 rows .*> data.max_bad_fraction=0.1.*first bad rows: 2, 5, 7"):
        list(loader)
    # Past 20 rows the bound is checked as rows come, before the later bad rows (25, 26) are read.
    large = write_parquet_folder(tmp_path / "large", {"train": with_bad_rows(30, [1, 4, 25, 26])})
    loader = build_dataloader(config(large, max_bad_fraction=0.05), 4, shuffle=False, infinite=False)
    with pytest.raises(DataError, match=r"2 of 20 rows .*first bad rows: 1, 4 \(first error: row 1: "):
        list(loader)


def test_missing_column_lists_the_columns_and_the_key(sources):
    with pytest.raises(
        DataError,
        match=r"column 'control_seg' \(data.control_column\) not in dataset '.*parquet' \(split train\); "
        r"columns: image, control_depth, text; set data.control_column=<one of them>",
    ):
        build_dataloader(config(sources["parquet folder"], control_column="control_seg"), 2)
    with pytest.raises(DataError, match=r"column 'caption' \(eval.caption_column\) not in .*columns: image, "):
        eval_cfg = EvalConfig(dataset=str(sources["imagefolder"]), split="train", caption_column="caption")
        build_dataloader(eval_cfg, 2, config_key="eval")


def test_control_paths_as_strings_explain_the_file_name_key(tmp_path, rows):
    folder = tmp_path / "if" / "train"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(rows[0]["image"])
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "control_depth": "d.png", "text": "x"}))
    with pytest.raises(DataError, match=r"column 'control_depth' .* holds strings.*'control_depth_file_name'"):
        build_dataloader(config(tmp_path / "if"), 1)


def test_empty_dataset_is_an_error(tmp_path):
    empty = tmp_path / "empty.parquet"
    as_dataset([]).to_parquet(str(empty))
    with pytest.raises(DataError, match=r"dataset '.*empty.parquet' \(split train\) has no rows"):
        build_dataloader(config(empty), 2)
    with pytest.raises(DataError, match=r"has no rows for process 0 of 1"):
        next(iter(build_dataloader(config(empty, streaming=True), 2)))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"no data in folder '.*nothing' \(data.dataset\)"):
        build_dataloader(config(tmp_path / "nothing"), 2)


def test_too_few_rows_for_the_layout_are_errors(sources):
    with pytest.raises(DataError, match=r"reads 5 rows per epoch, fewer than batch_size=8"):
        build_dataloader(config(sources["parquet folder"], max_samples=10), 8, process_index=1, num_processes=2)
    with pytest.raises(DataError, match=r"has 1 rows, fewer than the 2 processes"):
        build_dataloader(config(sources["parquet folder"], max_samples=1), 1, process_index=1, num_processes=2)
    with pytest.raises(DataError, match=r"data.max_samples=0 leaves no rows"):
        build_dataloader(config(sources["parquet folder"], max_samples=0), 1)


def test_missing_path_split_and_hub_dataset_fail_fast(sources, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"dataset path './no/such/data' \(data.dataset\) does not exist"):
        build_dataloader(config("./no/such/data"), 2)
    with pytest.raises(DataError, match=r"split 'test' \(data.split\) not in .*train.*validation"):
        build_dataloader(config(sources["parquet folder"], split="test"), 2)
    with pytest.raises(DataError, match=r"split 'test' \(data.split\) not in save_to_disk .*splits: train, validation"):
        build_dataloader(config(sources["save_to_disk"], split="test"), 2)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(HubUnreachableError, match=r"hub dataset 'someone/not-a-dataset' \(data.dataset\).*DIR"):
        build_dataloader(config("someone/not-a-dataset"), 2)
    assert time.monotonic() - start < 10
