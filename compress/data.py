"""Data sources and named splits.

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, flattened to 64 features),
``mnist1d`` (generated locally and deterministically, never downloaded), ``file`` (an
``.npz`` or ``.pt`` holding ``x`` and optional ``y``), ``callable`` (``pkg.module:fn``
called as ``fn(split, **kwargs)`` returning ``x`` or ``(x, y)``) and ``text`` (a UTF-8 file
of one text per line, blank lines skipped, turned into ``x`` by a tokenizer ``fn(lines,
**kwargs)``; no labels). Stages never load data: the runner builds a ``DataBundle`` from
the recipe and hands it over in the stage context.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from compress.errors import DataError
from compress.imports import import_callable

if TYPE_CHECKING:
    from compress.recipe import DataSplitSpec

log = logging.getLogger(__name__)

BUILTIN_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _mnist1d() -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # seed 42: the paper's 4000 train / 1000 test set
    d = make_dataset(args)  # generates locally; get_dataset() would try to download
    return {
        "train_x": d["x"].astype(np.float32),
        "train_y": d["y"].astype(np.int64),
        "test_x": d["x_test"].astype(np.float32),
        "test_y": d["y_test"].astype(np.int64),
    }


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))  # fixed 80/20 split
    cut = int(0.8 * len(x))
    tr, te = perm[:cut], perm[cut:]
    return {"train_x": x[tr], "train_y": y[tr].astype(np.int64), "test_x": x[te], "test_y": y[te].astype(np.int64)}


def builtin(source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a built-in data set's ``train`` or ``test`` split."""
    if split not in BUILTIN_SPLITS:
        raise DataError(f"source {source!r} has splits {', '.join(BUILTIN_SPLITS)}; got {split!r}")
    d = {"mnist1d": _mnist1d, "digits": _digits}[source]()
    return d[f"{split}_x"], d[f"{split}_y"]


def _load_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                content = {k: f[k] for k in f.files}
        elif path.suffix == ".pt":
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(raw, dict):
                raise DataError(f"{path}: expected a dict with 'x' (and optional 'y'), got {type(raw).__name__}")
            content = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in raw.items()}
        else:
            raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use .npz or .pt")
    except DataError:
        raise
    except Exception as err:  # corrupt archive, bad pickle opcode, ...
        raise DataError(f"{path}: cannot read data file ({err})") from err
    if "x" not in content:
        raise DataError(f"{path}: no array named 'x' (found: {', '.join(sorted(content)) or 'nothing'})")
    return content["x"], content.get("y")


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as UTF-8 text ({err})") from err
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path}: no text in the file (one text per line expected)")
    return lines


def _load_text(path: Path, ref: str, kwargs: dict, trusted: frozenset[str] = frozenset()) -> np.ndarray:
    lines = read_lines(path)
    fn = import_callable(ref, what="tokenizer", error=DataError, trusted=trusted)
    try:
        x = fn(lines, **kwargs)
    except Exception as err:
        raise DataError(f"tokenizer {ref} failed on {path}: {type(err).__name__}: {err}") from err
    if isinstance(x, torch.Tensor):
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim < 1 or len(x) != len(lines):
        raise DataError(
            f"tokenizer {ref} returned {len(x) if x.ndim else 'no'} rows for the {len(lines)} lines of {path}"
        )
    return x


def _load_callable(
    ref: str, split: str, kwargs: dict | None = None, trusted: frozenset[str] = frozenset()
) -> tuple[np.ndarray, np.ndarray | None]:
    fn = import_callable(ref, what="data callable", error=DataError, trusted=trusted)
    try:
        out = fn(split, **(kwargs or {}))
    except Exception as err:
        raise DataError(f"data callable {ref} failed for split {split!r}: {err}") from err
    if isinstance(out, dict):
        return out["x"], out.get("y")
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


@dataclass
class Split:
    """One named split: inputs, optional integer labels, and how to batch them."""

    name: str
    x: torch.Tensor
    y: torch.Tensor | None
    batch_size: int
    seed: int

    def __len__(self) -> int:
        return len(self.x)

    def loader(self, shuffle: bool = False, batch_size: int | None = None, drop_last: bool = False):
        from torch.utils.data import DataLoader, TensorDataset

        tensors = (self.x,) if self.y is None else (self.x, self.y)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            TensorDataset(*tensors),
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            generator=g,
            drop_last=drop_last,
        )

    def batches(self, batch_size: int | None = None):
        """Input batches in order (no labels): for calibration and inference."""
        bs = batch_size or self.batch_size
        for i in range(0, len(self.x), bs):
            yield self.x[i : i + bs]


def load_split(
    name: str,
    spec: DataSplitSpec,
    base_dir: Path,
    input_shape: tuple[int, ...] | None,
    trusted: frozenset[str] = frozenset(),
) -> Split:
    """Materialise one recipe split, checked against the model's input shape.

    ``trusted`` holds the recipe's ``trusted_callables`` (see ``compress.imports``).
    """
    y: np.ndarray | None
    if spec.source in ("mnist1d", "digits"):
        x, y = builtin(spec.source, spec.split)
    elif spec.source == "file":
        assert spec.path is not None  # DataSplitSpec's validator requires it for this source
        path = Path(spec.path)
        x, y = _load_file(path if path.is_absolute() else base_dir / path)
    elif spec.source == "text":
        assert spec.path is not None and spec.fn is not None  # DataSplitSpec's validator requires both
        path = Path(spec.path)
        x, y = _load_text(path if path.is_absolute() else base_dir / path, spec.fn, spec.kwargs, trusted), None
    else:  # callable
        assert spec.fn is not None  # DataSplitSpec's validator requires it for this source
        x, y = _load_callable(spec.fn, spec.split, spec.kwargs, trusted)
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.ndim < 1:
        raise DataError(f"data split {name!r}: x must be a numeric array, got dtype {x.dtype} shape {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise DataError(f"data split {name!r}: x holds {bad:,} NaN or infinite values; clean the data first")
    if y is not None:
        y = np.asarray(y)
        if y.shape[:1] != x.shape[:1]:
            raise DataError(f"data split {name!r}: x has {len(x)} samples but y has {len(y)}")
        if y.dtype.kind not in "iu":
            raise DataError(f"data split {name!r}: labels y must be integers, got {y.dtype}")
        if y.size and y.min() < 0:
            raise DataError(f"data split {name!r}: labels y must be class indices >= 0, found {int(y.min())}")
    if spec.samples is not None and spec.samples < len(x):
        idx = np.random.default_rng(spec.seed).permutation(len(x))[: spec.samples]
        idx.sort()
        x = x[idx]
        y = None if y is None else y[idx]
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape[1:]):
        raise DataError(
            f"data split {name!r} ({spec.source}) has samples of shape {list(x.shape[1:])}, "
            f"but the model's input_shape is {list(input_shape)} (per sample {list(input_shape[1:])})"
        )
    if len(x) == 0:
        raise DataError(f"data split {name!r} is empty")
    return Split(
        name=name,
        # Integer inputs (token ids, indices) stay integers; everything else is float32.
        x=torch.as_tensor(np.ascontiguousarray(x), dtype=torch.int64 if x.dtype.kind in "iu" else torch.float32),
        y=None if y is None else torch.as_tensor(y.astype(np.int64)),
        batch_size=spec.batch_size,
        seed=spec.seed,
    )


@dataclass
class DataBundle:
    """The recipe's splits (``train``, ``eval``, ``calibration``), loaded."""

    splits: dict[str, Split]

    def has(self, name: str) -> bool:
        return name in self.splits

    def __getitem__(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(
                f"this stage needs the data split {name!r}; add it under 'data:' in the recipe "
                f"(present: {', '.join(self.splits) or 'none'})"
            )
        return self.splits[name]

    def calibration(self) -> Split:
        """Calibration data: the ``calibration`` split, else ``train``."""
        return self.splits.get("calibration") or self["train"]
