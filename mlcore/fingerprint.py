"""Content identity of a run: which config fields, data and files its result depends on.

A training run's *fingerprint* hashes exactly what can change its weights:

* the result fields of its config sections (``mlcore.configlib.result_content``: fields marked
  ``NOT_RESULT`` where they are defined, such as ``data.num_workers`` or ``train.device``, are
  left out; a ``FILE`` field such as ``model.pretrained_file`` counts by its bytes, not its path);
* the content of the dataset splits it reads (:func:`split_digest`), never the directory they
  live in, so two copies of a dataset give the same keys and adding a ``test`` split to a
  dataset leaves the training keys of ``train``/``val`` unchanged;
* anything else the caller adds (a teacher's class subset, the keys of the stages it reads).

The pipeline's stage keys and the resume check of ``mlcore.train.train`` both use it: a run
resumes only from a checkpoint with the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlcore import configlib
from mlcore.data.manifest import MANIFEST_FILE, filesystem, is_uri, read_info

_BLOCK = 1 << 20


def stable_hash(*parts: Any, length: int = 12) -> str:
    """Hex digest of JSON-serialisable parts (dict keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _cached(cache_dir: str | os.PathLike | None, location: str, tag: str, compute) -> str:
    """``compute()``, memoised on disk by (location, size, mtime): a big file is hashed once per
    change (a local path or an object-store URI)."""
    if cache_dir is None:
        return compute()
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    name = stable_hash(location, info.size, info.mtime_ns, tag, length=24)
    memo = Path(cache_dir) / "digests" / f"{name}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    value = compute()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(value)
    os.replace(tmp, memo)
    return value


def file_digest(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 (first 16 hex digits) of a file's bytes.

    Raises:
        FileNotFoundError: The file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")

    def compute() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
        return digest.hexdigest()[:16]

    return _cached(cache_dir, str(path.resolve()), "file", compute)


def split_digest(
    root: str | os.PathLike, splits: Iterable[str], cache_dir: str | os.PathLike | None = None
) -> str:
    """Digest of the class names and of every row of ``splits``: id, path, bytes and labels.

    Images stored by path are identified by their path relative to the image root (hashing
    every external image file on each run would cost a full read of the dataset); embedded
    images by their bytes. Streams the manifest, so memory stays bounded.
    """
    splits = sorted(set(splits))
    location = str(root) if is_uri(root) else str(Path(root).expanduser().resolve())
    location = f"{location.rstrip('/')}/{MANIFEST_FILE}"

    def compute() -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(list(read_info(root).class_names)).encode())
        fs, path = filesystem(location)
        parquet = pq.ParquetFile(fs.open_input_file(path))
        columns = [c for c in ("image_id", "path", "image_bytes", "labels", "split")]
        columns = [c for c in columns if c in parquet.schema_arrow.names]
        for split in splits:
            digest.update(f"\0split:{split}\0".encode())
            for batch in parquet.iter_batches(batch_size=4096, columns=columns):
                rows = batch.filter(pc.equal(batch.column("split"), split))
                for name in columns[:-1]:
                    column = rows.column(name)
                    # Arrow's buffers include validity bitmaps and offsets: hash values instead.
                    for value in column.to_pylist():
                        digest.update(value if isinstance(value, bytes) else repr(value).encode())
                        digest.update(b"\0")
        return digest.hexdigest()[:16]

    return _cached(cache_dir, location, "splits:" + ",".join(splits), compute)


def config_content(section: Any, cache_dir: str | os.PathLike | None = None) -> Any:
    """A config section's result fields as plain data, ``FILE`` fields by content."""
    return configlib.result_content(section, lambda p: file_digest(p, cache_dir))
