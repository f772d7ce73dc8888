"""Data sources: files and datasets loaded into train/val/test splits.

Four sources, one result (`Splits`: train/val/test with class names):
- `medmnist`: a MedMNIST `.npz` file (`data.path`; or `$KD_KERAS_DATA_DIR/<name>.npz`; or
  downloaded with its published MD5 into the Keras cache on a machine with internet);
- `folder`: `<path>/{train,val,test}/<class>/<image>` (the Kermany chest_xray layout);
- `csv`: `<path>/<split>.csv` with `filename,label` rows, images in `<path>/<split>/`;
- `cifar10`: `keras.datasets.cifar10` online, or a local copy of the python batches
  (`data_batch_1..5`, `test_batch`), restricted to `data.classes`.

The pipelines (`kd_keras.data.pipeline`) yield (float32 RGB pixels in [0, 255] at the model's input
size, int32 label). Grey images are replicated to three channels. When a source has no validation
split, a stratified one is carved from train with `data.val_fraction`.
"""

from __future__ import annotations

import csv
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_keras.config import DataConfig
from kd_keras.data.images import image_files
from kd_keras.errors import KDError
from kd_keras.io import is_download_error

SPLITS = ("train", "val", "test")

# What `pickle.load` raised on ~9,000 random, truncated and bit-flipped CIFAR-10 batches (the
# pickle docs warn of "AttributeError, EOFError, ImportError, and IndexError" too); OSError is
# opening the file. Only pickle runs inside the `try` that catches them: none is a kd_keras bug.
UNPICKLING_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, OverflowError, ImportError,
                     AttributeError, LookupError, TypeError, MemoryError, OSError)  # fmt: skip
# a broken cifar-10-python.tar.gz in Keras's cache: keras.utils.get_file re-raises tarfile's
# errors, keras.datasets.cifar10 unpickles the batches
CIFAR_CACHE_ERRORS = (tarfile.TarError, pickle.UnpicklingError, EOFError)

# MedMNIST: class names and published checksums (medmnist.INFO) per image size.
MEDMNIST = {
    "pneumoniamnist": {
        "classes": ["normal", "pneumonia"],
        "md5": {
            28: "28209eda62fecd6e6a2d98b1501bb15f",
            64: "8f4eceb4ccffa70c672198ea285246c6",
            128: "05b46931834c231683c68f40c47b2971",
            224: "d6a3c71de1b945ea11211b03746c1fe1",
        },
    },
}
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@dataclass
class Split:
    """Images (a uint8 array N x H x W [x C], or a list of image file paths) and int labels."""

    images: np.ndarray | list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        images = (
            self.images[index] if isinstance(self.images, np.ndarray)
            else [self.images[i] for i in index]
        )  # fmt: skip
        return Split(images, self.labels[index])


@dataclass
class Splits:
    class_names: list[str]
    train: Split
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict[str, dict[str, int]]:
        return {
            name: {c: int((split.labels == i).sum()) for i, c in enumerate(self.class_names)}
            for name, split in (("train", self.train), ("val", self.val), ("test", self.test))
        }


# ---------------------------------------------------------------- sources


def medmnist_file_name(dataset: str, size: int) -> str:
    return f"{dataset}.npz" if size == 28 else f"{dataset}_{size}.npz"


def resolve_medmnist_path(dataset: str, size: int, path: str | None) -> Path:
    """Local path, else `$KD_KERAS_DATA_DIR/<file>`, else a checksummed download."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise KDError(f"data file not found: {p}")
        return p
    name = medmnist_file_name(dataset, size)
    data_dir = os.environ.get("KD_KERAS_DATA_DIR")
    if data_dir and (Path(data_dir) / name).is_file():
        return Path(data_dir) / name
    info = MEDMNIST.get(dataset)
    if info is None:
        raise KDError(
            f"unknown MedMNIST dataset {dataset!r} for download (known: {', '.join(MEDMNIST)}); "
            "set data.path to a local .npz file"
        )
    import keras

    try:
        return Path(
            keras.utils.get_file(
                name,
                origin=MEDMNIST_URL.format(file=name),
                file_hash=info["md5"][size],
                hash_algorithm="md5",
                cache_subdir="medmnist",
            )
        )
    except Exception as err:
        if not is_download_error(err):  # a bug: keep its own type and traceback
            raise
        raise KDError(
            f"could not download {name} ({str(err).splitlines()[0][:160]}); put the file in a "
            "folder named by KD_KERAS_DATA_DIR or set data.path"
        ) from err


def load_npz(path: Path, class_names: list[str] | None) -> tuple[list[str], dict[str, Split]]:
    """The splits of a MedMNIST-layout `.npz` (`<split>_images`, `<split>_labels`; `val`
    optional), checked to add up: equal lengths, integer labels >= 0, images uint8 (0..255) or
    float with values in 0..255 (float images in [0, 1] are refused: multiply by 255)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise KDError(f"data file {path} is not a readable .npz (corrupt or truncated)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as err:  # numpy's pickle refusal: object arrays
        raise KDError(f"data file {path} holds object (pickled) arrays, which kd_keras does not "
                      "load; save images and labels as plain numeric arrays") from err  # fmt: skip
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise KDError(f"data file {path} is not a readable .npz (corrupt or truncated)") from err
    splits = {}
    for split in SPLITS:
        if f"{split}_images" not in arrays and f"{split}_labels" not in arrays and split == "val":
            continue
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in arrays:
                held = sorted(arrays)
                raise KDError(f"data file {path} has no '{key}' array (MedMNIST layout: "
                              f"<split>_images and <split>_labels; it holds {held})")  # fmt: skip
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        _check_npz_split(path, split, images, labels)
        splits[split] = Split(images, labels.reshape(-1).astype("int64"))
    n = int(max(s.labels.max() for s in splits.values())) + 1
    return class_names or [f"class_{i}" for i in range(n)], splits


def _check_npz_split(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Refuse a split whose images and labels do not add up (see `load_npz`)."""
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise KDError(f"data file {path}: '{split}_images' has shape {images.shape}; expected "
                      "(N, H, W) grey or (N, H, W, 1|3) images")  # fmt: skip
    if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
        raise KDError(f"data file {path}: '{split}_labels' has shape {labels.shape}; expected "
                      "one label per image, (N,) or (N, 1)")  # fmt: skip
    if len(images) != len(labels.reshape(-1)):
        raise KDError(f"data file {path}: '{split}_images' holds {len(images)} images but "
                      f"'{split}_labels' {labels.size} labels; they must be equal")  # fmt: skip
    if len(images) == 0:
        raise KDError(f"data file {path}: split '{split}' is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        as_int = labels.astype("int64") if np.issubdtype(labels.dtype, np.floating) else None
        if as_int is None or not np.array_equal(as_int, labels):
            raise KDError(f"data file {path}: '{split}_labels' are {labels.dtype}, not whole "
                          "class indices 0..k-1")  # fmt: skip
    if labels.min() < 0:
        raise KDError(f"data file {path}: '{split}_labels' has negative label {labels.min()}; "
                      "labels are class indices 0..k-1")  # fmt: skip
    if images.dtype == np.uint8:
        return
    if not np.issubdtype(images.dtype, np.number) or np.issubdtype(
        images.dtype, np.complexfloating
    ):
        raise KDError(f"data file {path}: '{split}_images' are {images.dtype}; expected uint8 "
                      "pixels 0..255")  # fmt: skip
    low, high = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
        raise KDError(f"data file {path}: '{split}_images' values span {low:g}..{high:g}; "
                      "expected pixels 0..255 (uint8, or float in 0..255)")  # fmt: skip
    if np.issubdtype(images.dtype, np.floating) and high <= 1.0:
        raise KDError(f"data file {path}: '{split}_images' are {images.dtype} in {low:g}..{high:g}"
                      ", which looks like [0, 1] scaling; kd_keras expects pixels 0..255: save "
                      "them multiplied by 255 (as uint8)")  # fmt: skip


def load_folder(root: Path, class_names: list[str] | None) -> tuple[list[str], dict[str, Split]]:
    if not (root / "train").is_dir():
        raise KDError(f"data folder {root} has no train/ sub-folder (expected train/<class>/...)")
    if class_names is None:
        class_names = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(class_names) < 2:
        raise KDError(f"data folder {root / 'train'} needs at least two class sub-folders")
    splits = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        paths, labels = [], []
        for i, name in enumerate(class_names):
            files = [str(p) for p in image_files(root / split / name)]
            paths += files
            labels += [i] * len(files)
        if not paths:
            raise KDError(f"data folder {root / split} holds no images in {class_names}")
        splits[split] = Split(paths, np.asarray(labels, "int64"))
    return class_names, splits


def _read_csv_rows(table: Path) -> list[tuple[str, str]]:
    try:
        with table.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"filename", "label"} <= set(reader.fieldnames):
                raise KDError(f"{table} must have a header with columns filename,label")
            rows = []
            for line, r in enumerate(reader, start=2):
                if not r.get("filename") or r.get("label") is None or not r["label"].strip():
                    raise KDError(f"{table}, line {line}: needs a filename and a label")
                rows.append((r["filename"], r["label"].strip()))
            return rows
    except (UnicodeDecodeError, csv.Error) as err:
        raise KDError(f"{table} is not a readable UTF-8 CSV file: {err}") from err


def load_csv(root: Path, class_names: list[str] | None) -> tuple[list[str], dict[str, Split]]:
    """Seed 000's layout: `<split>.csv` rows of filename,label; images in `<root>/<split>/`.

    Without `data.classes` the classes are the labels of train.csv (numbers sorted
    numerically); a label elsewhere that train does not have is an error, never a new class.
    """
    rows = {split: _read_csv_rows(root / f"{split}.csv") for split in SPLITS
            if (root / f"{split}.csv").is_file()}  # fmt: skip
    if "train" not in rows or "test" not in rows:
        raise KDError(f"data folder {root} needs train.csv and test.csv (filename,label rows)")
    inferred = class_names is None
    if inferred:
        seen = sorted({label for _, label in rows["train"]})
        numeric = all(label.lstrip("-").isdigit() for label in seen)
        if numeric and any(int(label) < 0 for label in seen):
            bad = min(seen, key=int)
            raise KDError(f"{root / 'train.csv'}: label {bad} is negative; labels are 0..k-1 "
                          "or class names")  # fmt: skip
        class_names = [str(v) for v in sorted(int(x) for x in seen)] if numeric else seen
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, items in rows.items():
        paths, labels = [], []
        for filename, label in items:
            if label not in index:
                where = "the labels of train.csv" if inferred else "data.classes"
                raise KDError(
                    f"{root / (split + '.csv')}: label {label!r} is not among {where} "
                    f"{class_names}; fix the file or set data.classes"
                )
            path = root / split / filename
            if not path.is_file():
                raise KDError(f"image listed in {split}.csv not found: {path}")
            paths.append(str(path))
            labels.append(index[label])
        splits[split] = Split(paths, np.asarray(labels, "int64"))
    return class_names, splits


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except UNPICKLING_ERRORS as err:
        raise KDError(f"CIFAR-10 batch {path} is not readable: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise KDError(f"CIFAR-10 batch {path} is not readable: it holds no b'data' and b'labels'")
    try:
        images = np.asarray(batch[b"data"], "uint8").reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(batch[b"labels"], "int64")
    except (ValueError, TypeError, OverflowError) as err:  # numpy on data of another shape or type
        raise KDError(f"CIFAR-10 batch {path} is not readable: {err}") from err


def load_cifar10(path: str | None, classes: list[str] | None):
    classes = classes or CIFAR10_CLASSES
    unknown = [c for c in classes if c not in CIFAR10_CLASSES]
    if unknown:
        raise KDError(
            f"data.classes has unknown CIFAR-10 classes {unknown}; valid: {CIFAR10_CLASSES}"
        )
    if path:
        root = Path(path)
        files = [root / f"data_batch_{i}" for i in range(1, 6)]
        missing = [str(f) for f in files + [root / "test_batch"] if not f.is_file()]
        if missing:
            raise KDError(f"CIFAR-10 python batches not found: {', '.join(missing)}")
        parts = [_read_cifar_batch(f) for f in files]
        x_train = np.concatenate([p[0] for p in parts])
        y_train = np.concatenate([p[1] for p in parts])
        x_test, y_test = _read_cifar_batch(root / "test_batch")
    else:
        import keras

        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        except Exception as err:
            # a failed download, or a cached archive that is broken (tar) or truncated (pickle)
            if not is_download_error(err) and not isinstance(err, CIFAR_CACHE_ERRORS):
                raise
            raise KDError(
                "could not download CIFAR-10 (no internet?); download cifar-10-python.tar.gz on a "
                "connected machine, unpack it and set data.path to the folder holding "
                "data_batch_1..5 and test_batch"
            ) from err
    keep = [CIFAR10_CLASSES.index(c) for c in classes]
    remap = {old: new for new, old in enumerate(keep)}
    splits = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        y = y.reshape(-1)
        mask = np.isin(y, keep)
        splits[split] = Split(x[mask], np.asarray([remap[v] for v in y[mask]], "int64"))
    return list(classes), splits


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-stratified random subset of size `n` (sorted)."""
    from sklearn.model_selection import train_test_split

    if n >= len(labels):
        return np.arange(len(labels))
    index, _ = train_test_split(
        np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed
    )
    return np.sort(index)


def load_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """Load the configured source into train/val/test splits."""
    if cfg.source == "medmnist":
        path = resolve_medmnist_path(cfg.dataset, cfg.medmnist_size, cfg.path)
        known = MEDMNIST.get(cfg.dataset, {}).get("classes")
        names, splits = load_npz(path, cfg.classes or known)
    elif cfg.source == "folder":
        root = Path(cfg.path)
        if not root.is_dir():
            raise KDError(f"data folder not found: {root}")
        names, splits = load_folder(root, cfg.classes)
    elif cfg.source == "csv":
        root = Path(cfg.path)
        if not root.is_dir():
            raise KDError(f"data folder not found: {root}")
        names, splits = load_csv(root, cfg.classes)
    else:
        names, splits = load_cifar10(cfg.path, cfg.classes)

    for name, split in splits.items():
        if len(split) and split.labels.min() < 0:
            raise KDError(f"the {name} split has a negative label ({split.labels.min()}); "
                          "labels must be 0..k-1")  # fmt: skip
        if len(split) and split.labels.max() >= len(names):
            raise KDError(f"labels go up to {split.labels.max()} but only {len(names)} class names")
    train = splits["train"]
    if "val" not in splits:
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(
            np.arange(len(train)), test_size=cfg.val_fraction, stratify=train.labels,
            random_state=seed,
        )  # fmt: skip
        splits["val"] = train.subset(np.sort(va))
        train = train.subset(np.sort(tr))
    if cfg.limit_train:
        train = train.subset(stratified_subset(train.labels, cfg.limit_train, seed))
    return Splits(names, train, splits["val"], splits["test"])
