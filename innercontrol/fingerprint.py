"""What made an output: normalised paths and content hashes of model weights.

Outputs that are reused across runs (evaluation images, annotation maps) record these, so a rerun over the same
folder can tell "same weights, same data" from "same path, other weights" (a retrained model in the same folder).
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Optional

# The files from_pretrained and the condition loaders read: weights, configs, tokenizer files. Checkpoints in other
# formats (.ckpt, .onnx, .msgpack) that sit beside them in hub snapshots are never loaded, so they are not hashed.
HASHED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model")


def normalized_path(value) -> Optional[str]:
    """An existing local path as an absolute path (relative and absolute spellings agree); anything else unchanged."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


@cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; size and mtime are part of the cache key, so a rewritten file is hashed again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """Content id of one file. A hub cache entry is a link to blobs/<content hash>: that name is used unread."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs":
        return f"blob:{target.name}"
    stat = target.stat()
    return _file_digest(str(target), stat.st_size, stat.st_mtime_ns)


def content_digest(path: str | Path) -> str:
    """sha256 over the weight and config files of a model file or folder (names and contents; hidden files skipped)."""
    path = Path(path).expanduser()
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"'{path}' is neither a file nor a folder, so it has no content to fingerprint")
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or file.suffix not in HASHED_SUFFIXES:
            continue
        if file.is_file():
            digest.update(f"{relative.as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def changed_settings(recorded: dict, now: dict, keys=None, recorded_where: str = "on disk") -> list[str]:
    """'key: <recorded> on disk, <now> now' for every key (default: all of `now`) whose value differs."""
    keys = list(now) if keys is None else keys
    return [f"{k}: {recorded.get(k)!r} {recorded_where}, {now[k]!r} now" for k in keys if recorded.get(k) != now[k]]
