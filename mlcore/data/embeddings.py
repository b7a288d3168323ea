"""Class embeddings for word queries: one vector per class name, from a word-vector file.

Accepted files:

* **Text** (``.txt``, ``.vec``): GloVe (``word v1 … vE`` per line), fastText or word2vec text
  (the same, after a ``COUNT DIM`` header line, which is detected and checked). The width ``E``
  comes from the header or from the numbers ending the first line. Lines are read as bytes and
  only those whose first token could be needed are parsed, so a multi-GB file costs one pass
  and the memory of the vectors asked for; a word may contain spaces (the last ``E`` fields
  are the vector).
* **NumPy** ``.npz`` with a names array and a vectors array: the keys ``names``/``vectors``,
  else ``class_names``/``words`` and ``embeddings``/``glove``, else the only 1-D string array and
  the only 2-D float array with as many rows (``label_stats/coco2014.npz`` reads as is).
* **NumPy** ``.npy`` holding a structured array with fields ``name`` and ``vector``. A bare
  matrix is refused: without names its rows could silently follow another class order
  (the trap of column order in the authors' ZSL code).

Lookup of a class name, first rule that finds every key it needs:

1. the name exactly, then lowercased, then with its spaces as ``_`` (word2vec phrases);
2. its words (split on whitespace and ``_``: ``baseball bat``, ``traffic_light``), each
   exactly or lowercased: the mean of the word vectors.

Names no rule finds are one :class:`ClassEmbeddingError` listing every one of them with the
words that were missing (ML_Decoder#49: out-of-vocabulary class names).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlcore.config import DataConfig
from mlcore.configlib import ConfigError
from mlcore.data.manifest import ManifestError

__all__ = [
    "DATASET_FILE",
    "ClassEmbeddingError",
    "ClassEmbeddings",
    "dataset_class_embeddings",
    "load_class_embeddings",
]

DATASET_FILE = "class_embeddings.npz"
"""A dataset's own class embeddings, beside its manifest (``cpsd data synth --compositional``)."""

_WORD_SPLIT = re.compile(r"[\s_]+")
_NAME_KEYS = ("names", "class_names", "words")
_VECTOR_KEYS = ("vectors", "embeddings", "glove")
# Missing names shown in an error before "...": enough to fix a file, bounded for 10k classes.
_MAX_LISTED = 50


class ClassEmbeddingError(ManifestError):
    """An embedding file is unreadable or malformed, or lacks vectors for some class names."""


@dataclass(frozen=True)
class ClassEmbeddings:
    """Class names and their vectors, row ``i`` for ``names[i]``.

    Attributes:
        names: Class names.
        vectors: ``(N, E)`` float32.
    """

    names: tuple[str, ...]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.names):
            raise ValueError(
                f"{len(self.names)} names need an (N, E) table, got {self.vectors.shape}"
            )

    @property
    def dim(self) -> int:
        """Embedding width ``E``."""
        return int(self.vectors.shape[1])

    def subset(self, indices: Sequence[int]) -> ClassEmbeddings:
        """The rows ``indices``, in that order."""
        idx = list(indices)
        return ClassEmbeddings(tuple(self.names[i] for i in idx), self.vectors[idx])

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` (``names``, ``vectors``) that :func:`load_class_embeddings` reads."""
        np.savez(path, names=np.array(self.names, dtype=str), vectors=self.vectors)


def _rules(name: str) -> list[list[str]]:
    """Key lists to try for ``name``, in order; a list of several keys is averaged."""
    words = [w for w in _WORD_SPLIT.split(name.strip()) if w]
    whole = [name, name.lower(), re.sub(r"\s+", "_", name.strip())]
    rules = [[key] for key in dict.fromkeys(whole)]
    if len(words) > 1:
        rules.append(words)
    rules.append([w.lower() for w in words])
    return rules


def _resolve(names: Sequence[str], found: Mapping[str, np.ndarray], path: Path) -> ClassEmbeddings:
    rows, missing = [], []
    for name in names:
        for keys in _rules(name):
            if all(k in found for k in keys):
                rows.append(np.mean([found[k] for k in keys], axis=0))
                break
        else:
            words = [w for w in _WORD_SPLIT.split(name.strip()) if w]
            absent = [w for w in words if w not in found and w.lower() not in found]
            missing.append(f"{name!r}" + (f" (no {', '.join(absent)})" if len(words) > 1 else ""))
    if missing:
        shown = "; ".join(missing[:_MAX_LISTED]) + ("; ..." if len(missing) > _MAX_LISTED else "")
        raise ClassEmbeddingError(
            f"{path}: no vector for {len(missing)} of {len(names)} class names: {shown}. Add "
            "them to the file (a multi-word name needs each word), or rename the classes"
        )
    return ClassEmbeddings(tuple(names), np.stack(rows).astype(np.float32))


def _needed_keys(names: Iterable[str]) -> set[str]:
    return {key for name in names for keys in _rules(name) for key in keys}


def _read_text(path: Path, needed: set[str]) -> dict[str, np.ndarray]:
    """Vectors of the ``needed`` words of a GloVe/fastText/word2vec text file."""
    encoded = {k.encode(): k for k in needed}
    # The first token of a needed key: a line is parsed only when its first token is one.
    heads = {k.split(b" ", 1)[0] for k in encoded}
    found: dict[str, np.ndarray] = {}
    dim: int | None = None
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.rstrip(b"\r\n ")
                if not line:
                    continue
                if dim is None:
                    fields = line.split(b" ")
                    if len(fields) == 2 and all(x.isdigit() for x in fields):
                        dim = int(fields[1])  # word2vec / fastText header: COUNT DIM
                        if dim < 1:
                            raise ClassEmbeddingError(f"{path} line 1: header dimension {dim}")
                        continue
                    # The trailing numeric fields, leaving at least one for the word (which
                    # may contain spaces, or be a number itself).
                    dim = min(len(fields) - 1, _trailing_numbers(fields))
                    if dim < 1:
                        raise ClassEmbeddingError(
                            f"{path} line {lineno}: expected 'word v1 ... vE', got {_show(line)}"
                        )
                if line.split(b" ", 1)[0] not in heads:
                    continue
                parts = line.rsplit(b" ", dim)
                if len(parts) != dim + 1 or not parts[0]:
                    raise ClassEmbeddingError(
                        f"{path} line {lineno}: expected a word and {dim} numbers, got "
                        f"{len(parts) - 1} fields after {_show(parts[0])}"
                    )
                key = encoded.get(parts[0])
                if key is None or key in found:
                    continue
                try:
                    found[key] = np.array([float(x) for x in parts[1:]], dtype=np.float32)
                except ValueError:
                    raise ClassEmbeddingError(
                        f"{path} line {lineno}: non-numeric value in the vector of {key!r}"
                    ) from None
    except FileNotFoundError:
        raise ClassEmbeddingError(f"class embedding file not found: {path}") from None
    except OSError as e:
        raise ClassEmbeddingError(f"{path}: cannot read: {e.strerror}") from None
    if dim is None:
        raise ClassEmbeddingError(f"{path}: empty embedding file")
    return found


def _trailing_numbers(fields: list[bytes]) -> int:
    count = 0
    for field in reversed(fields):
        try:
            float(field)
        except ValueError:
            break
        count += 1
    return count


def _show(raw: bytes, limit: int = 40) -> str:
    text = raw.decode(errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _pick(arrays: Mapping[str, np.ndarray], preferred: Sequence[str], fits, what: str, path):
    for key in preferred:
        if key in arrays and fits(arrays[key]):
            return key
    candidates = [k for k, a in arrays.items() if fits(a)]
    if len(candidates) != 1:
        raise ClassEmbeddingError(
            f"{path}: cannot tell which array holds the {what} (keys: {', '.join(arrays)}); "
            f"name it {preferred[0]!r}"
        )
    return candidates[0]


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The vectors of a ``.npz`` (names + vectors arrays) or a structured ``.npy``."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ClassEmbeddingError(f"class embedding file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ClassEmbeddingError(f"{path}: not a readable NumPy file without pickles: {e}") from e
    if isinstance(loaded, np.ndarray):
        fields = loaded.dtype.names or ()
        if loaded.ndim != 1 or "name" not in fields or "vector" not in fields:
            raise ClassEmbeddingError(
                f"{path}: a .npy must be a 1-D structured array with fields 'name' and 'vector' "
                f"(got dtype {loaded.dtype}, shape {loaded.shape}); a bare matrix has no class "
                "names. Save np.savez(path, names=..., vectors=...) instead"
            )
        names, vectors = loaded["name"], loaded["vector"]
    else:
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
        name_key = _pick(
            arrays, _NAME_KEYS, lambda a: a.ndim == 1 and a.dtype.kind == "U", "names", path
        )
        rows = len(arrays[name_key])
        vector_key = _pick(
            arrays,
            _VECTOR_KEYS,
            lambda a: a.ndim == 2 and a.dtype.kind == "f" and a.shape[0] == rows,
            f"vectors ({rows} rows of floats)",
            path,
        )
        names, vectors = arrays[name_key], arrays[vector_key]
    if vectors.ndim != 2 or vectors.shape[0] != len(names):
        raise ClassEmbeddingError(f"{path}: {len(names)} names but vectors {vectors.shape}")
    found: dict[str, np.ndarray] = {}
    for i, name in enumerate(names.tolist()):
        if name in found:
            raise ClassEmbeddingError(f"{path}: name {name!r} repeated (entry {i})")
        found[name] = vectors[i].astype(np.float32)
    return found


def load_class_embeddings(path: str | os.PathLike, names: Sequence[str]) -> ClassEmbeddings:
    """Vectors for ``names``, in that order (see the module docstring for formats and lookup).

    Args:
        path: ``.txt``/``.vec`` word-vector text, ``.npz`` or structured ``.npy``.
        names: Class names.

    Returns:
        The names and their ``(N, E)`` float32 vectors.

    Raises:
        ClassEmbeddingError: Unknown suffix, unreadable or malformed file (naming the line or
            key), non-finite vectors, or names without a vector (all listed).
    """
    path = Path(path).expanduser()
    if not names:
        raise ClassEmbeddingError("no class names to look up")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".vec"):
        found = _read_text(path, _needed_keys(names))
    elif suffix in (".npz", ".npy"):
        found = _read_arrays(path)
    else:
        raise ClassEmbeddingError(
            f"{path}: unknown embedding format {suffix!r} (use .txt, .vec, .npz or .npy)"
        )
    embeddings = _resolve(names, found, path)
    bad = [n for n, v in zip(names, embeddings.vectors, strict=True) if not np.isfinite(v).all()]
    if bad:
        raise ClassEmbeddingError(f"{path}: non-finite vectors for {bad[:_MAX_LISTED]}")
    zero = [n for n, v in zip(names, embeddings.vectors, strict=True) if not v.any()]
    if zero:
        raise ClassEmbeddingError(f"{path}: all-zero vectors (no direction) for {zero}")
    return embeddings


def dataset_class_embeddings(
    cfg: DataConfig, dataset_dir: str | os.PathLike, names: Sequence[str]
) -> ClassEmbeddings:
    """The vectors of ``names`` from ``data.class_embeddings``, else the dataset's own file.

    Raises:
        ConfigError: Neither is there.
        ClassEmbeddingError: See :func:`load_class_embeddings`.
    """
    if cfg.class_embeddings is not None:
        return load_class_embeddings(cfg.class_embeddings, names)
    own = Path(dataset_dir) / DATASET_FILE
    if not own.is_file():
        raise ConfigError(
            f"word queries need class embeddings: set data.class_embeddings (dataset "
            f"{dataset_dir} has no {DATASET_FILE})"
        )
    return load_class_embeddings(own, names)
