"""Bag-of-words data: the 20news .feat parser, the sparse storage, .npz matrices and text folders."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

from elbolab.data import load_data
from elbolab.data.bow import (
    NEWSGROUPS,
    NEWSGROUPS_FILE,
    find_20news_dir,
    is_bow_path,
    load_bow_npz,
    load_bow_path,
    load_text_folder,
    read_feat,
    read_vocabulary,
    save_bow_npz,
)
from elbolab.errors import DataError

REAL_20NEWS = Path("/work/shared/data/20news")
VOCAB = ["apple", "banana", "cherry", "date", "elder"]


def write_corpus(folder: Path, n_train: int = 12, n_test: int = 4) -> np.ndarray:
    """A 20news-format folder; returns the dense counts of train then test ([n_train + n_test, 5])."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.new").write_text("".join(f"{w} 0\n" for w in VOCAB))
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 4, size=(n_train + n_test, len(VOCAB)))
    for name, rows in (("train.feat", dense[:n_train]), ("test.feat", dense[n_train:])):
        lines = []
        for i, row in enumerate(rows):
            tokens = [f"{j + 1}:{c}" for j, c in enumerate(row) if c]
            lines.append(" ".join([str(i % 3)] + tokens[::-1]))  # ids out of order, as in the real files
        (folder / name).write_text("\n".join(lines) + "\n")
    return dense


def test_feat_parser_reads_one_based_ids_into_sparse_counts(tmp_path):
    (tmp_path / "a.feat").write_text("2 1:3 5:1\n0 \n7 4:2 2:1 3:1\n")
    x, y = read_feat(tmp_path / "a.feat", 5)
    assert scipy.sparse.issparse(x) and x.dtype == np.float32
    expected = np.array([[3, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 1, 2, 0]], dtype=np.float32)
    np.testing.assert_array_equal(x.toarray(), expected)
    assert y.tolist() == [2, 0, 7]


@pytest.mark.parametrize("line, message", [
    ("1 0:2", "outside 1..5"),  # ids count from 1
    ("1 6:2", "outside 1..5"),
    ("1 2:0", "count 0"),
    ("1 2:x", "'2:x' is not 'id:count'"),
    ("1 2", "'2' is not 'id:count'"),
    ("x 2:1", "label 'x' is not an integer"),
    ("1 2:1 2:3", "appears twice"),
    ("", "blank"),
])
def test_feat_parser_names_file_and_line_of_malformed_input(tmp_path, line, message):
    path = tmp_path / "bad.feat"
    path.write_text(f"1 1:1\n{line}\n1 3:2\n")
    with pytest.raises(DataError, match=message) as caught:
        read_feat(path, 5)
    assert str(path) in str(caught.value) and "line 2" in str(caught.value)


def test_vocabulary_errors_name_the_line(tmp_path):
    path = tmp_path / "vocab.new"
    path.write_text("a 0\nb 0\na 0\n")
    with pytest.raises(DataError, match="line 3 repeats the word 'a' of line 1"):
        read_vocabulary(path)
    path.write_text("a 0\n\nb\n")
    with pytest.raises(DataError, match="line 2 is blank"):
        read_vocabulary(path)
    path.write_text("a 0\nb 7\n")
    assert read_vocabulary(path) == ["a", "b"]


def test_20news_source_splits_train_by_seed_and_densifies_batches(tmp_path):
    dense = write_corpus(tmp_path / "20news")
    splits = load_data("20news", data_dir=tmp_path, val_size=3, seed=1)  # finds DIR/20news
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 4)
    assert splits.train.meta["vocabulary"] == VOCAB
    for data in (splits.train, splits.val):
        assert scipy.sparse.issparse(data.x)
        rows = data.source_index.numpy()
        batch = data.batch(torch.arange(len(data)))
        np.testing.assert_array_equal(batch.x.numpy(), dense[rows])  # densified per batch, row for row
        assert batch.y.tolist() == [r % 3 for r in rows]
    assert sorted(splits.train.source_index.tolist() + splits.val.source_index.tolist()) == list(range(12))
    np.testing.assert_array_equal(splits.test.batch(torch.arange(4)).x.numpy(), dense[12:])
    again = load_data("20news", data_dir=tmp_path, val_size=3, seed=1)
    assert again.val.source_index.tolist() == splits.val.source_index.tolist()
    other = load_data("20news", data_dir=tmp_path, val_size=3, seed=2)
    assert other.val.source_index.tolist() != splits.val.source_index.tolist()


def test_20news_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("ELBOLAB_DATA", raising=False)
    with pytest.raises(DataError, match="not found; searched"):
        find_20news_dir(tmp_path)
    write_corpus(tmp_path / "c")
    (tmp_path / "c" / "test.feat").unlink()
    with pytest.raises(DataError, match="lacks test.feat"):
        find_20news_dir(tmp_path / "c")
    write_corpus(tmp_path / "d")
    with pytest.raises(DataError, match="binarize='dynamic' does not apply"):
        load_data("20news", data_dir=tmp_path / "d", binarize="dynamic")
    monkeypatch.setenv("ELBOLAB_DATA", str(tmp_path / "env"))
    write_corpus(tmp_path / "env" / "20news")
    assert find_20news_dir() == tmp_path / "env" / "20news"


def test_npz_matrix_with_vocabulary_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    dense = rng.integers(0, 3, size=(40, 5)).astype(np.float32)
    path = save_bow_npz(tmp_path / "m.npz", scipy.sparse.csr_matrix(dense), VOCAB, y=np.arange(40) % 2)
    assert is_bow_path(path)
    splits = load_bow_npz(path, val_size=0.2)
    assert splits.train.meta["vocabulary"] == VOCAB
    total = sum(len(s) for s in (splits.train, splits.val, splits.test))
    assert total == 40
    rows = splits.val.source_index.numpy()
    np.testing.assert_array_equal(splits.val.batch(torch.arange(len(rows))).x.numpy(), dense[rows])
    assert splits.val.y.tolist() == (rows % 2).tolist()
    scipy.sparse.save_npz(tmp_path / "plain.npz", scipy.sparse.csr_matrix(dense))  # scipy's own format
    (tmp_path / "plain.vocab.txt").write_text("\n".join(VOCAB) + "\n")
    assert load_bow_path(tmp_path / "plain.npz").test.meta["vocabulary"] == VOCAB
    np.save(tmp_path / "dense.npy", dense)
    assert not is_bow_path(tmp_path / "dense.npy")


def test_npz_rejects_weights_and_a_wrong_vocabulary(tmp_path):
    weights = scipy.sparse.csr_matrix(np.array([[0.5, 1.0], [1.0, 0.0], [2.0, 1.0]], dtype=np.float32))
    with pytest.raises(DataError, match="expected word counts"):
        load_bow_npz(save_bow_npz(tmp_path / "w.npz", weights))
    counts = scipy.sparse.csr_matrix(np.ones((3, 2), dtype=np.float32))
    with pytest.raises(DataError, match="vocabulary has 3 words but the matrix 2 columns"):
        load_bow_npz(save_bow_npz(tmp_path / "v.npz", counts, ["a", "b", "c"]))


def test_text_folder_counts_words_and_labels_subfolders(tmp_path):
    for topic, words in (("space", "orbit moon orbit launch"), ("sport", "goal team goal goal")):
        (tmp_path / topic).mkdir()
        for i in range(4):
            (tmp_path / topic / f"{i}.txt").write_text(f"The {words} and {i} the")
    splits = load_text_folder(tmp_path, max_features=4, val_size=2)
    vocabulary = splits.train.meta["vocabulary"]
    assert len(vocabulary) == 4 and "the" not in vocabulary  # English stop words dropped, 4 most frequent kept
    assert {"goal", "orbit"} <= set(vocabulary) <= {"goal", "orbit", "moon", "launch", "team"}  # 12, 8, then 4 each
    assert splits.train.meta["class_names"] == ["space", "sport"]
    for data in (splits.train, splits.val, splits.test):
        x = data.batch(torch.arange(len(data))).x
        for row, label in zip(x, data.y):
            if label == 1:
                assert row[vocabulary.index("goal")] == 3
            else:
                assert row[vocabulary.index("orbit")] == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected at least 3 documents"):
        load_text_folder(tmp_path / "empty")


def relabel(folder: Path, label) -> None:
    """Replace the first column (the label) of train.feat and test.feat: line i (from 0, per file) gets label(i)."""
    for name in ("train.feat", "test.feat"):
        lines = (folder / name).read_text().splitlines()
        (folder / name).write_text("".join(f"{label(i)} {line.partition(' ')[2]}\n" for i, line in enumerate(lines)))


def test_20news_labels_are_newsgroups_with_their_names(tmp_path):
    write_corpus(tmp_path / "20news", n_train=40, n_test=20)
    relabel(tmp_path / "20news", lambda i: i % 20 + 1)  # the newsgroups numbered 1..20
    splits = load_data("20news", data_dir=tmp_path, val_size=5)
    for data in (splits.train, splits.val, splits.test):
        assert data.meta["class_names"] == list(NEWSGROUPS) and data.meta["label_name"] == "newsgroup"
        assert data.meta["label_values"] == list(range(1, 21))
        # class ids 0..19 in the order of the values: document r of a file had value r % 20 + 1
        rows = data.source_index
        assert data.y.tolist() == (rows % 20).tolist()
    assert NEWSGROUPS[10] == "rec.sport.hockey" and len(set(NEWSGROUPS)) == 20


def test_20news_names_file_names_any_number_of_labels(tmp_path):
    folder = tmp_path / "20news"
    write_corpus(folder)  # labels r % 3: 0, 1, 2
    (folder / NEWSGROUPS_FILE).write_text("sci.space\nrec.autos\n\ntalk.politics.guns\n")  # a blank line is skipped
    splits = load_data("20news", data_dir=folder, val_size=3)
    assert splits.test.meta["class_names"] == ["sci.space", "rec.autos", "talk.politics.guns"]
    (folder / NEWSGROUPS_FILE).write_text("sci.space\nrec.autos\n")
    with pytest.raises(DataError, match=r"names 2 newsgroups but the \.feat files hold 3 label values \(0, 1, 2\)"):
        load_data("20news", data_dir=folder, val_size=3)
    (folder / NEWSGROUPS_FILE).unlink()
    assert load_data("20news", data_dir=folder, val_size=3).train.meta["class_names"] == ["0", "1", "2"]


def test_20news_placeholder_label_gives_no_labels(tmp_path):
    """The NVDM files label every document 1: that is no newsgroup, so y is None and the meta say why."""
    write_corpus(tmp_path / "20news")
    relabel(tmp_path / "20news", lambda i: 1)
    splits = load_data("20news", data_dir=tmp_path, val_size=3)
    for data in (splits.train, splits.val, splits.test):
        assert data.y is None and "class_names" not in data.meta
        assert "every document 1" in data.meta["labels_note"]
    assert splits.train.batch(torch.arange(3)).y is None


@pytest.mark.skipif(not (REAL_20NEWS / "train.feat").is_file(), reason="20news files not present")
def test_real_20news_files():
    splits = load_data("20news", data_dir=REAL_20NEWS)
    vocabulary = splits.train.meta["vocabulary"]
    assert splits.train.dim == len(vocabulary) == 1995
    assert len(splits.train) + len(splits.val) == 11259 and len(splits.test) == 7488
    # ids count from 1: the most frequent training word is "write" (line 2 of vocab.new), column 1
    totals = np.asarray(splits.train.x.sum(axis=0)).ravel()
    assert vocabulary[int(totals.argmax())] == "write"
    assert splits.test.y is None and "placeholder" in splits.test.meta["labels_note"]  # every document is labelled 1
