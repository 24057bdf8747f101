"""Image classification data: a folder of ``<label>/<image>`` files, scikit-learn's digits, Debian's Fashion-MNIST
(package ``dataset-fashion-mnist``), or a hub dataset id;
a seeded stratified train/test split and a seeded K-shots-per-class subset.

Images are decoded only when a task encodes them (:meth:`ImageDataset.image`), so a large hub dataset or
folder costs memory only for the examples that are used.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from decaf_ext.data.text import _stratified_order
from decaf_ext.errors import ConfigError, first_line

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST = "fashion-mnist"  # the dataset name that means Debian's Fashion-MNIST files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where dataset-fashion-mnist puts its IDX files
FASHION_MNIST_NAMES: list[str] = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                  "sneaker", "bag", "ankle boot"]
DIGIT_NAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class ImageDataset:
    """Examples `rows` (int64 [n]) of `source`, whose items are image files, PIL images or uint8 arrays
    [H, W] / [H, W, C]; labels int64 [n] ids into label_names."""

    source: Sequence[Any]
    rows: np.ndarray
    labels: np.ndarray
    label_names: list[str]

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != self.rows.shape or self.rows.ndim != 1:
            raise ValueError(f"labels must have shape [{len(self.rows)}], got {list(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The examples at `indices` (int [k]), in that order, with the same label names (nothing decoded)."""
        return ImageDataset(self.source, self.rows[indices], self.labels[indices], self.label_names)

    def image(self, i: int) -> Image.Image:
        """Example `i` decoded as an RGB PIL image."""
        item = self.source[int(self.rows[i])]
        if isinstance(item, (str, Path)):
            with Image.open(item) as opened:
                return opened.convert("RGB")
        if isinstance(item, np.ndarray):
            item = Image.fromarray(item)
        return item.convert("RGB")


def decode_image(item: str | Path | Image.Image) -> Image.Image:
    """`item` (an image file or a PIL image) as an RGB PIL image; ConfigError naming ``image`` and the file when it
    cannot be read or decoded."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    try:
        with Image.open(item) as opened:
            return opened.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError, a truncated file, a folder
        raise ConfigError(f"image: cannot decode {str(item)!r} ({first_line(error)})") from None


class _Column(Sequence):
    """Lazy view of one column of a datasets.Dataset: item i is decoded on access."""

    def __init__(self, table, column: str) -> None:
        self.table, self.column = table, column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        return self.table[int(i)][self.column]


# ---------------------------------------------------------------------------------------------- sources


def _check_classes(labels: np.ndarray, source: str) -> None:
    """ValueError unless `labels` hold at least two distinct classes."""
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"{source!r} has examples of {len(present)} class(es); at least 2 are needed")


def _is_readable_image(file: Path) -> bool:
    """True when PIL can identify `file` and its data passes ``verify()`` (a truncated file fails)."""
    try:
        with Image.open(file) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def read_image_folder(root: str | Path) -> ImageDataset:
    """Every <root>/<label>/<file>: labels numbered by sorted folder name, files in sorted order.

    Hidden entries (names starting with '.') are ignored; every other file must be a readable image (one of
    IMAGE_SUFFIXES, decodable by PIL): otherwise ValueError naming how many are not and the first of them.
    """
    root = Path(root)
    folders = sorted(f for f in root.iterdir() if f.is_dir() and not f.name.startswith("."))
    files, labels = [], []
    for label, folder in enumerate(folders):
        found = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        if not found:
            raise ValueError(f"class folder {folder.name!r} of {str(root)!r} holds no images")
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{str(root)!r} holds no <label>/<image> files")
    bad = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES or not _is_readable_image(f)]
    if bad:
        raise ValueError(f"{len(bad)} of {len(files)} files under {str(root)!r} are not readable images "
                         f"(first: {str(bad[0].relative_to(root))!r}); remove them")
    _check_classes(np.array(labels), str(root))
    return ImageDataset([str(f) for f in files], np.arange(len(files)), np.array(labels), [f.name for f in folders])


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's digits (1,797 grayscale 8x8 images of 0-9, 16 levels) as uint8 [8, 8] arrays, offline."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("'digits' needs the package scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return ImageDataset(list(pixels), np.arange(len(pixels)), digits.target, list(DIGIT_NAMES))


def read_idx(path: str | Path, *, dims: int) -> np.ndarray:
    """The uint8 array stored in the gzipped IDX file `path` (magic 0x00000800 + `dims`, then `dims` big-endian
    uint32 sizes, then the bytes); ValueError naming the file if it is not one."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    header = 4 * (dims + 1)
    sizes = np.frombuffer(data[4:header], dtype=">u4").astype(np.int64)
    if data[:4] != bytes([0, 0, 8, dims]) or len(sizes) != dims or len(data) != header + int(np.prod(sizes)):
        raise ValueError(f"{str(path)!r} is not a uint8 IDX file of {dims} dimension(s)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(sizes)


def load_fashion_mnist(folder: str | Path | None = None) -> ImageDataset:
    """Fashion-MNIST's 70,000 grayscale 28x28 images of 10 clothing classes (its train and t10k files pooled, in
    that order) as uint8 [28, 28] arrays, read from `folder` (default FASHION_MNIST_DIR, where Debian's
    dataset-fashion-mnist puts them)."""
    folder = Path(folder or FASHION_MNIST_DIR)
    images, labels = [], []
    for split in ("train", "t10k"):
        files = (folder / f"{split}-images-idx3-ubyte.gz", folder / f"{split}-labels-idx1-ubyte.gz")
        if not all(file.is_file() for file in files):
            raise ValueError(f"'{FASHION_MNIST}' needs {files[0].name} and {files[1].name} in {str(folder)!r} "
                             "(apt-get install dataset-fashion-mnist)")
        images.append(read_idx(files[0], dims=3))
        labels.append(read_idx(files[1], dims=1))
        if len(images[-1]) != len(labels[-1]):
            raise ValueError(f"{str(folder)!r}: {len(images[-1])} {split} images but {len(labels[-1])} labels")
    pixels, targets = np.concatenate(images), np.concatenate(labels).astype(np.int64)
    if targets.max(initial=0) >= len(FASHION_MNIST_NAMES):
        raise ValueError(f"{str(folder)!r}: label {int(targets.max())} is not a Fashion-MNIST class")
    return ImageDataset(pixels, np.arange(len(pixels)), targets, list(FASHION_MNIST_NAMES))


def _from_hub(source: str) -> ImageDataset:
    """Every split of hub dataset `source` pooled: its first Image column, labels from 'label' or the first
    ClassLabel column (ClassLabel names kept; other label values numbered by sorted value)."""
    import datasets

    try:
        splits = datasets.load_dataset(source)
    except Exception as error:  # offline, unknown id, gated: all end here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{source!r} is not 'digits', a local folder of <label>/<image> files, or a reachable "
                         f"Hugging Face dataset id ({reason})") from error
    table = datasets.concatenate_datasets(list(splits.values()))
    features = table.features
    image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label_column = "label" if "label" in features else next(
        (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_column is None or label_column is None:
        raise ValueError(f"{source!r} needs an image column and a 'label' or ClassLabel column "
                         f"(columns: {table.column_names})")
    values = table[label_column]
    if isinstance(features[label_column], datasets.ClassLabel):
        names, labels = list(features[label_column].names), np.asarray(values)
    else:
        names = sorted(set(values))
        ids = {value: i for i, value in enumerate(names)}
        labels, names = np.array([ids[v] for v in values]), [str(n) for n in names]
    kept = np.flatnonzero(labels >= 0)  # ClassLabel -1: unlabelled
    dataset = ImageDataset(_Column(table, image_column), kept, labels[kept], names)
    _check_classes(dataset.labels, source)
    return dataset


def read_image_source(source: str) -> ImageDataset:
    """All examples of `source`: 'digits' or 'fashion-mnist' (offline), a local folder of <label>/<image>, or a
    hub dataset id."""
    if source == "digits":
        return load_digits_dataset()
    if source == FASHION_MNIST:
        return load_fashion_mnist()
    if Path(source).is_dir():
        return read_image_folder(source)
    return _from_hub(source)


def load_image_dataset(source: str, *, test_fraction: float = 0.2, seed: int = 0
                       ) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) of `source` (see :func:`read_image_source`; a hub dataset's splits are pooled), split
    with a seeded stratified order: test gets round(test_fraction * n) examples."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    dataset = read_image_source(source)
    order = _stratified_order(dataset.labels, np.random.default_rng(seed))
    n_test = round(test_fraction * len(order))
    if not 0 < n_test < len(order):
        raise ValueError(f"test_fraction={test_fraction} leaves an empty train or test set of {len(order)} examples")
    return dataset.subset(order[n_test:]), dataset.subset(order[:n_test])


def shots_per_class(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted int64 indices of `shots` examples of every class present in `labels` (int [n]), drawn with a
    generator seeded by `seed`; ValueError if a class has fewer."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise ValueError(f"{shots} exceeds the {len(members)} training examples of class {int(label)}")
        chosen.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(chosen)).astype(np.int64)
