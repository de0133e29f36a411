"""Dataset front end for training, probe training and evaluation: sharded per process, resumable, robust to bad rows.

    loader = build_dataloader(cfg.data, batch_size=8, process_index=rank, num_processes=world_size, seed=cfg.seed)
    for batch in loader:             # endless by default; each epoch re-shuffles with (seed, epoch)
        batch["pixel_values"]        # (B, 3, R, R) float in [-1, 1], R = data.resolution (bicubic, aspect not kept)
        batch["control"]             # (B, 3, R, R) float in [0, 1]; only when data.control_column is set
        batch["caption"]             # list[str], after caption dropout (data.caption_dropout)
        batch["row_id"]              # stable row ids: the row's index; streamed, "sha1:<image hash>" or the file path
    state = loader.state_dict()      # JSON-able; save one per process with every checkpoint
    loader.load_state_dict(state)    # the next batches are those an uninterrupted run would have produced

Sources (data.dataset):
- a hub id such as limingcv/MultiGen-20M_depth: streamed (seeded shuffle buffer of data.shuffle_buffer rows)
  unless data.streaming=false, which downloads it first;
- a parquet file, or a folder of parquet files with splits named as on the hub (data/train-00000-of-00002.parquet)
  or as subfolders (train/, validation/); `python -m innercontrol.synthetic` writes one;
- an imagefolder: images with a metadata.jsonl holding "file_name" and the caption column. A control image is
  named by the key "<control_column>_file_name" (datasets' convention), a path relative to metadata.jsonl, e.g.
  {"file_name": "0.png", "control_depth_file_name": "depth/0.png", "text": "a cat"};
- a save_to_disk folder (a Dataset, or a DatasetDict whose split is chosen by data.split).
Local sources are read memory-mapped unless data.streaming=true. data.max_samples keeps the first rows only.

Order and sharding: a map-style dataset is read in a seeded permutation per epoch, and process i of n takes every
n-th row of it; a streamed dataset is shuffled by datasets (shards, then a buffer) and split with
split_dataset_by_node (whole shards per process when their number divides n, else every n-th row). Either way
the processes' rows in one epoch are disjoint and together are the whole dataset; their counts may differ (by one
row, or by a shard's worth when streamed). Streamed with several processes, data.max_samples keeps that many rows in
all, the first ones of each process's part. Do not pass the loader to accelerator.prepare: it already shards.

Resume: the state is (epoch, rows of this process's epoch consumed, counters). Restoring skips that many rows of
the same deterministic order, and caption dropout is a function of (seed, epoch, process, position), so the next
batches are exact. Skipping is free for map-style data; a streamed dataset re-reads (downloads) the skipped rows,
about rows_consumed * row size per process (images are not decoded while skipping).

Decoding (PIL, bicubic resize) runs in data.num_workers spawned processes, or inline when 0; the order of batches
does not depend on it. Controls that are not stored (hed, lineart, canny) are not computed here: the training step
computes them batched on the accelerator, and batches then have no "control".

Bad data: a row whose image or control cannot be decoded is skipped, counted in loader.stats and logged with its row
id. Once at least 20 rows were read (or at the end of an epoch), a bad fraction above data.max_bad_fraction stops
the run with the first bad row ids. A missing column, split or path, and an empty dataset, fail at start-up.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from PIL import Image

from innercontrol.hub import HubUnreachableError

logger = logging.getLogger(__name__)

MIN_ROWS_FOR_BAD_CHECK = 20  # below this many rows read, the bad fraction is checked only at the end of an epoch
MAX_KEPT_BAD_IDS = 1000  # bad row ids kept in loader.stats (and so in checkpoints)
MAX_LOGGED_BAD_ROWS = 100  # one warning per bad row up to this many, then only counts
READ_CHUNK = 64  # rows fetched together from a map-style dataset
STATE_VERSION = 1

RowId = Union[int, str]


class DataError(ValueError):
    """A dataset that cannot be used as configured: missing path, split or column, no rows, too many bad rows."""


class RawRow(NamedTuple):
    """One undecoded row: image and control as stored (bytes, {"bytes", "path"} dict, path or PIL image)."""

    row_id: Optional[RowId]  # None: derived from the image bytes when decoded (streamed rows have no index)
    image: Any
    control: Any
    caption: Any


class Sample(NamedTuple):
    """One decoded row: uint8 (R, R, 3) arrays, or `error` set when the row could not be decoded."""

    row_id: RowId
    image: Optional[np.ndarray]
    control: Optional[np.ndarray]
    caption: str
    error: Optional[str] = None


@dataclass
class DataStats:
    """Rows read by this process (bad ones included) and the bad rows skipped."""

    rows_read: int = 0
    bad_rows: int = 0
    bad_row_ids: list = field(default_factory=list)  # the first MAX_KEPT_BAD_IDS distinct ones
    first_error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Opening a source


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".parquet", ".arrow", ".jsonl"))


def _even_shards(num_rows: int, num_processes: int) -> int:
    """Shards for a streamed save_to_disk dataset: a multiple of the process count, so each reads whole shards."""
    per_process = max(1, min(num_rows // max(num_processes, 1), 16))
    return per_process * num_processes if num_rows >= num_processes else 1


def open_source(
    name: str, split: str, streaming: Optional[bool] = None, num_processes: int = 1, config_key: str = "data"
):
    """The split of a hub id or local path as a datasets.Dataset (map-style) or datasets.IterableDataset (streamed)."""
    import datasets

    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise FileNotFoundError(f"dataset path '{name}' ({config_key}.dataset) does not exist")
        return _open_hub(name, split, True if streaming is None else streaming, config_key)
    streaming = bool(streaming)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"split '{split}' ({config_key}.split) not in save_to_disk folder '{name}'; "
                    f"splits: {', '.join(loaded)}"
                )
            loaded = loaded[split]
        if streaming:
            loaded = loaded.to_iterable_dataset(num_shards=_even_shards(len(loaded), num_processes))
        return loaded
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(
                f"dataset file '{name}' ({config_key}.dataset) is not a .parquet file; pass a parquet file, or a "
                "folder of parquet files, of images with metadata.jsonl, or written by save_to_disk"
            )
        builder, options = "parquet", {"data_files": str(path), "split": "train"}  # a lone file is one split
    else:
        builder, options = str(path), {"split": split}  # datasets infers parquet or imagefolder, and the splits
    try:
        return datasets.load_dataset(builder, streaming=streaming, **options)
    except ValueError as err:
        if "Unknown split" in str(err):
            raise DataError(f"split '{split}' ({config_key}.split) not in '{name}': {err}") from None
        if "corresponds to no data" in str(err):
            raise DataError(f"dataset '{name}' (split {split}) has no rows") from None
        raise DataError(f"cannot read '{name}' ({config_key}.dataset) as a dataset: {err}") from err
    except FileNotFoundError as err:  # datasets' DataFilesNotFoundError / EmptyDatasetError derive from it
        raise DataError(
            f"no data in folder '{name}' ({config_key}.dataset): expected parquet files, images with a "
            f"metadata.jsonl, or a save_to_disk folder ({type(err).__name__}: {err})"
        ) from err


def _open_hub(name: str, split: str, streaming: bool, config_key: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except ValueError as err:
        if "Unknown split" in str(err):
            raise DataError(f"split '{split}' ({config_key}.split) not in hub dataset '{name}': {err}") from None
        raise
    except (ConnectionError, OSError) as err:  # offline mode, no network, or not on the hub
        raise HubUnreachableError(
            f"hub dataset '{name}' ({config_key}.dataset) cannot be read ({type(err).__name__}: {err}); where the "
            f"hub is reachable run `hf download {name} --repo-type dataset --local-dir DIR`, copy DIR here and pass "
            f"{config_key}.dataset=DIR"
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# Decoding (runs in the decode workers)


def _open_image(stored: Any, what: str) -> Image.Image:
    if isinstance(stored, Image.Image):
        image = stored
    elif isinstance(stored, dict):
        if stored.get("bytes"):
            image = Image.open(io.BytesIO(stored["bytes"]))
        elif stored.get("path"):
            image = Image.open(stored["path"])
        else:
            raise ValueError(f"{what} cell has neither bytes nor path")
    elif isinstance(stored, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(stored)))
    elif isinstance(stored, str):
        image = Image.open(stored)
    elif stored is None:
        raise ValueError(f"{what} cell is empty")
    else:
        raise TypeError(f"{what} cell holds a {type(stored).__name__}, not an image")
    image.load()  # decode now: a truncated file fails here, not later in a batch
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white; 16-bit and float grayscale scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max() > 255):
            values = values / 257.0  # 16-bit depth maps: 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _resized(image: Image.Image, resolution: int) -> np.ndarray:
    image = to_rgb(image)
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _caption_text(caption: Any) -> str:
    if caption is None:
        return ""
    if isinstance(caption, (list, tuple)):  # several captions per image: the first one
        return str(caption[0]) if caption else ""
    return str(caption)


def _content_id(stored: Any) -> str:
    """Stable id of a streamed row: a hash of its image bytes (or its file path)."""
    if isinstance(stored, dict):
        stored = stored.get("bytes") or stored.get("path")
    if isinstance(stored, (bytes, bytearray, memoryview)):
        return "sha1:" + hashlib.sha1(bytes(stored)).hexdigest()[:16]
    if isinstance(stored, Image.Image):
        return "sha1:" + hashlib.sha1(stored.tobytes()).hexdigest()[:16]
    return str(stored)


def decode_row(row: RawRow, resolution: int, with_control: bool) -> Sample:
    """Decode and resize one row; any decoding failure gives a Sample with `error` set (a bad row)."""
    row_id = row.row_id if row.row_id is not None else _content_id(row.image)
    try:
        image = _resized(_open_image(row.image, "image"), resolution)
        control = _resized(_open_image(row.control, "control"), resolution) if with_control else None
    except Exception as err:  # whatever the decoder raises, the row is bad: counted and skipped by the loader
        return Sample(row_id, None, None, "", f"{type(err).__name__}: {err}")
    return Sample(row_id, image, control, _caption_text(row.caption))


def decode_rows(rows: list[RawRow], resolution: int, with_control: bool) -> list[Sample]:
    return [decode_row(row, resolution, with_control) for row in rows]


# ----------------------------------------------------------------------------------------------------------------------
# The dataset: one process's rows, in a deterministic order per epoch


class ControlDataset:
    """The rows of one split that process `process_index` of `num_processes` reads, in a seeded order per epoch."""

    def __init__(
        self,
        data_cfg: Any,
        split: Optional[str] = None,
        process_index: int = 0,
        num_processes: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        config_key: str = "data",
    ):
        import datasets

        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index={process_index} must lie in [0, num_processes={num_processes})")
        self.name = str(data_cfg.dataset)
        self.split = split or getattr(data_cfg, "split", None) or "train"
        self.resolution = int(data_cfg.resolution)
        self.image_column = getattr(data_cfg, "image_column", "image")
        self.caption_column = getattr(data_cfg, "caption_column", "text")
        self.control_column = getattr(data_cfg, "control_column", None)
        self.process_index, self.num_processes = process_index, num_processes
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.config_key = config_key
        self.description = f"dataset '{self.name}' (split {self.split})"

        source = open_source(self.name, self.split, getattr(data_cfg, "streaming", None), num_processes, config_key)
        self.streaming = isinstance(source, datasets.IterableDataset)
        columns = self._check_columns(source)
        source = source.select_columns(columns)
        for column in self._image_columns:
            if isinstance((source.features or {}).get(column), datasets.Image):
                source = source.cast_column(column, datasets.Image(decode=False))  # decode in our workers

        max_samples = getattr(data_cfg, "max_samples", None)
        if max_samples is not None:
            if max_samples < 1:
                raise DataError(f"{config_key}.max_samples={max_samples} leaves no rows of {self.description}")
            source = source.take(max_samples) if self.streaming else source.select(range(min(max_samples, len(source))))
        if self.streaming:
            if self.shuffle:
                source = source.shuffle(seed=self.seed, buffer_size=int(getattr(data_cfg, "shuffle_buffer", 1000)))
            if num_processes > 1:
                from datasets.distributed import split_dataset_by_node

                source = split_dataset_by_node(source, rank=process_index, world_size=num_processes)
        else:
            if len(source) == 0:
                raise DataError(f"{self.description} has no rows")
            if len(source) < num_processes:
                raise DataError(
                    f"{self.description} has {len(source)} rows, fewer than the {num_processes} processes: "
                    f"process {process_index} would read none"
                )
        self._source = source

    @property
    def _image_columns(self) -> list[str]:
        return [self.image_column] + ([self.control_column] if self.control_column else [])

    def _check_columns(self, source) -> list[str]:
        import datasets

        columns = source.column_names
        if columns is None:  # a stream whose features are only known from its rows
            first = next(iter(source.take(1)), None)
            if first is None:
                raise DataError(f"{self.description} has no rows")
            columns = list(first)
        wanted = {"image_column": self.image_column, "caption_column": self.caption_column}
        if self.control_column:
            wanted["control_column"] = self.control_column
        for key, column in wanted.items():
            if column not in columns:
                hint = " (or null to compute the control from the image)" if key == "control_column" else ""
                raise DataError(
                    f"column '{column}' ({self.config_key}.{key}) not in {self.description}; columns: "
                    f"{', '.join(columns)}; set {self.config_key}.{key}=<one of them>{hint}"
                )
        for column in self._image_columns:
            feature = (source.features or {}).get(column)
            if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
                raise DataError(
                    f"column '{column}' of {self.description} holds strings, not images; in an imagefolder's "
                    f"metadata.jsonl name the key '{column}_file_name' so that the file it names is loaded as an image"
                )
        return list(wanted.values())

    @property
    def num_rows(self) -> Optional[int]:
        """Rows this process reads per epoch; None when streamed (unknown until read)."""
        return None if self.streaming else len(range(self.process_index, len(self._source), self.num_processes))

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"{self.description} is streamed: its length is unknown (see num_rows)")
        return self.num_rows

    def _order(self, epoch: int) -> np.ndarray:
        """Indices this process reads in `epoch`: a slice of one permutation shared by all processes."""
        total = len(self._source)
        order = np.random.default_rng([self.seed, epoch]).permutation(total) if self.shuffle else np.arange(total)
        return order[self.process_index :: self.num_processes]

    def rows(self, epoch: int, start: int = 0) -> Iterator[RawRow]:
        """This process's undecoded rows of `epoch`, from the `start`-th on."""
        image, control, caption = self.image_column, self.control_column, self.caption_column
        if self.streaming:
            if self.shuffle:
                self._source.set_epoch(epoch)
            for row in islice(iter(self._source), start, None):  # skipped rows are read but not decoded
                yield RawRow(None, row[image], row[control] if control else None, row[caption])
            return
        order = self._order(epoch)
        for low in range(start, len(order), READ_CHUNK):
            indices = order[low : low + READ_CHUNK].tolist()
            block = self._source[indices]
            for j, index in enumerate(indices):
                yield RawRow(index, block[image][j], block[control][j] if control else None, block[caption][j])

    def decode(self, row: RawRow) -> Sample:
        return decode_row(row, self.resolution, self.control_column is not None)

    def __getitem__(self, index: int) -> Sample:
        """Row `index` of the dataset (not of the shard), decoded; for evaluation and inspection."""
        if self.streaming:
            raise TypeError(f"{self.description} is streamed: rows cannot be indexed")
        row = self._source[int(index)]
        control = row[self.control_column] if self.control_column else None
        return self.decode(RawRow(int(index), row[self.image_column], control, row[self.caption_column]))


# ----------------------------------------------------------------------------------------------------------------------
# The loader: batches, decode workers, caption dropout, bad rows, state


class ControlDataLoader:
    """Batches of one process's rows, with a data position that state_dict/load_state_dict save and restore."""

    def __init__(
        self,
        dataset: ControlDataset,
        batch_size: int,
        caption_dropout: float = 0.0,
        num_workers: int = 0,
        infinite: bool = True,
        drop_last: Optional[bool] = None,
        max_bad_fraction: float = 0.01,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.caption_dropout = float(caption_dropout)
        self.num_workers = int(num_workers)
        self.infinite = infinite
        # Endless training drops each epoch's last partial batch; a single pass (evaluation) keeps it.
        self.drop_last = infinite if drop_last is None else drop_last
        self.max_bad_fraction = float(max_bad_fraction)
        self.stats = DataStats()
        self._epoch = 0
        self._position = 0  # rows of this process's current epoch consumed by the batches yielded so far
        rows = dataset.num_rows
        if rows is not None and self.drop_last and rows < batch_size:
            raise DataError(
                f"{dataset.description}: process {dataset.process_index} reads {rows} rows per epoch, fewer than "
                f"batch_size={batch_size}, so no full batch can be made; lower the batch size or use more rows"
            )

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> Optional[int]:
        """Batches in one epoch of this process if no row is bad (bad rows make fewer); None when streamed."""
        rows = self.dataset.num_rows
        if rows is None:
            return None
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        """Endless batches when infinite, else the rest of the current epoch; a new iterator continues from state."""
        executor = None
        if self.num_workers > 0:
            # spawn, not fork: the parent may hold CUDA or threads that a forked child must not inherit
            executor = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            while True:
                yield from self._epoch_batches(executor)
                if not self.infinite:
                    return
        finally:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    def _epoch_batches(self, executor) -> Iterator[dict]:
        epoch, started_at = self._epoch, self._position
        batch, batches = [], 0
        for sample in self._decoded(epoch, started_at, executor):
            position = self._position
            self._position += 1
            self.stats.rows_read += 1
            if self.stats.rows_read == MIN_ROWS_FOR_BAD_CHECK:
                self._check_bad_fraction()
            if sample.error is not None:
                self._skip_bad_row(sample)
                continue
            batch.append(sample._replace(caption=self._dropout_caption(sample.caption, epoch, position)))
            if len(batch) == self.batch_size:
                batches += 1
                yield self._collate(batch)
                batch = []
        if self._position == 0:
            raise DataError(
                f"{self.dataset.description} has no rows for process {self.dataset.process_index} of "
                f"{self.dataset.num_processes}"
            )
        self._check_bad_fraction(at_epoch_end=True)
        if batch and not self.drop_last:
            batches += 1
            yield self._collate(batch)
        self._epoch, self._position = epoch + 1, 0
        if self.infinite and batches == 0 and started_at == 0:
            raise DataError(
                f"{self.dataset.description}: a whole epoch gave no batch of {self.batch_size} good rows for process "
                f"{self.dataset.process_index}; lower the batch size or use more rows"
            )

    def _decoded(self, epoch: int, start: int, executor) -> Iterator[Sample]:
        """Decoded rows in order; with workers, up to 2 * num_workers chunks are decoded ahead."""
        rows = self.dataset.rows(epoch, start)
        resolution, with_control = self.dataset.resolution, self.dataset.control_column is not None
        if executor is None:
            for row in rows:
                yield decode_row(row, resolution, with_control)
            return
        pending = deque()
        while True:
            chunk = list(islice(rows, self.batch_size))
            if chunk:
                pending.append(executor.submit(decode_rows, chunk, resolution, with_control))
            if pending and (not chunk or len(pending) > 2 * self.num_workers):
                yield from pending.popleft().result()
            if not chunk and not pending:
                return

    def _dropout_caption(self, caption: str, epoch: int, position: int) -> str:
        """Classifier-free-guidance dropout, drawn from (seed, epoch, process, position) so a resume repeats it."""
        if self.caption_dropout <= 0.0:
            return caption
        key = [self.dataset.seed, epoch, self.dataset.process_index, position, 1]  # trailing 1: its own stream
        return "" if np.random.default_rng(key).random() < self.caption_dropout else caption

    def _skip_bad_row(self, sample: Sample) -> None:
        stats = self.stats
        stats.bad_rows += 1
        stats.first_error = stats.first_error or f"row {sample.row_id}: {sample.error}"
        if len(stats.bad_row_ids) < MAX_KEPT_BAD_IDS and sample.row_id not in stats.bad_row_ids:
            stats.bad_row_ids.append(sample.row_id)  # each bad row once, though every epoch reads it again
        if stats.bad_rows <= MAX_LOGGED_BAD_ROWS:
            more = "; later bad rows are counted without a warning" if stats.bad_rows == MAX_LOGGED_BAD_ROWS else ""
            logger.warning(
                "skipped bad row %s of %s: %s%s", sample.row_id, self.dataset.description, sample.error, more
            )
        self._check_bad_fraction()

    def _check_bad_fraction(self, at_epoch_end: bool = False) -> None:
        """Raise when the bad fraction exceeds the bound, once enough rows were read to judge (or the epoch ended)."""
        stats = self.stats
        if not at_epoch_end and stats.rows_read < MIN_ROWS_FOR_BAD_CHECK:
            return
        if stats.bad_rows <= self.max_bad_fraction * stats.rows_read:
            return
        key = self.dataset.config_key
        raise DataError(
            f"{stats.bad_rows} of {stats.rows_read} rows read from {self.dataset.description} could not be decoded "
            f"({stats.bad_rows / stats.rows_read:.1%} > {key}.max_bad_fraction={self.max_bad_fraction:g}); "
            f"first bad rows: {', '.join(map(str, stats.bad_row_ids[:10]))} (first error: {stats.first_error}); "
            f"fix or drop those rows, or raise {key}.max_bad_fraction"
        )

    @staticmethod
    def _collate(samples: list[Sample]) -> dict:
        import torch  # here, not at the top, so that decode workers start without importing torch

        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
        batch = {
            "pixel_values": (images.float() / 127.5 - 1.0).contiguous(),
            "caption": [s.caption for s in samples],
            "row_id": [s.row_id for s in samples],
        }
        if samples[0].control is not None:
            controls = torch.from_numpy(np.stack([s.control for s in samples])).permute(0, 3, 1, 2)
            batch["control"] = (controls.float() / 255.0).contiguous()
        return batch

    def state_dict(self) -> dict:
        """The data position after the last batch yielded (plain JSON types); one per process."""
        ds = self.dataset
        return {
            "version": STATE_VERSION,
            "dataset": ds.name,
            "split": ds.split,
            "seed": ds.seed,
            "shuffle": ds.shuffle,
            "process_index": ds.process_index,
            "num_processes": ds.num_processes,
            "epoch": self._epoch,
            "position": self._position,
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the order must be the same, so seed, shuffle and processes must match."""
        ds = self.dataset
        for key in ("seed", "shuffle", "process_index", "num_processes"):
            if state[key] != getattr(ds, key):
                raise DataError(
                    f"the data state was saved with {key}={state[key]} but this loader has {key}={getattr(ds, key)}; "
                    "the saved position only holds for the same order, so resume with the same seed, shuffle and "
                    "number of processes"
                )
        if (state["dataset"], state["split"]) != (ds.name, ds.split):
            logger.warning(
                "restoring a data position saved for dataset '%s' (split %s) on %s; fine if it holds the same rows",
                state["dataset"],
                state["split"],
                ds.description,
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self.stats = DataStats(**state["stats"])


def build_dataloader(
    data_cfg: Any,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    seed: int = 0,
    split: Optional[str] = None,
    shuffle: bool = True,
    infinite: bool = True,
    drop_last: Optional[bool] = None,
    num_workers: Optional[int] = None,
    config_key: str = "data",
) -> ControlDataLoader:
    """The loader for `data_cfg` (a DataConfig, or any object with its fields, e.g. EvalConfig with config_key="eval")."""
    dataset = ControlDataset(data_cfg, split, process_index, num_processes, seed, shuffle, config_key)
    return ControlDataLoader(
        dataset,
        batch_size,
        caption_dropout=getattr(data_cfg, "caption_dropout", 0.0),
        num_workers=getattr(data_cfg, "num_workers", 0) if num_workers is None else num_workers,
        infinite=infinite,
        drop_last=drop_last,
        max_bad_fraction=getattr(data_cfg, "max_bad_fraction", 0.01),
    )
