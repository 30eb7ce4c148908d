"""Bags of words: the 20 Newsgroups files of the NVDM paper, a user's document-term matrix, a folder of texts.

Every loader returns DataSplits of TensorData holding x as a scipy.sparse CSR matrix of float32 word counts
[N, V] (densified per batch by TensorData), the vocabulary in ``meta["vocabulary"]`` (a list of V words, column
order) and labels as y when there are any.

* ``--data 20news``: ``train.feat`` / ``test.feat`` (one document per line: ``label id:count id:count ...``, word
  ids counting from 1 as the lines of ``vocab.new``, whose lines are ``word [anything]``), found in data_dir,
  data_dir/20news or $ELBOLAB_DATA/20news. The validation split is drawn from train.feat by seed; test is
  test.feat (Miao, Yu & Blunsom 2016 use the same train/test files). The labels are the newsgroups, numbered 0..C-1
  in the order of the files' label values, named in ``meta["class_names"]`` (``meta["label_name"]`` is
  "newsgroup"): by an optional ``newsgroups.txt`` in the same folder (one name per line, for the label values in
  increasing order), else, for 20 label values, by the 20 newsgroups in alphabetical order (the order of the
  20news-bydate folders and of scikit-learn's ``target_names``). The NVDM files label every document 1 (a
  placeholder, not a newsgroup): such files give no labels (y is None) and say so in ``meta["labels_note"]``.
* ``load_bow_npz(path)``: a scipy.sparse ``save_npz`` file (or ``numpy.savez`` of data/indices/indptr/shape with
  format "csr"), optionally with a ``vocabulary`` string array and labels ``y`` in the same archive, or a sibling
  ``<stem>.vocab.txt`` (one word per line). Split like any array file (15% test, val_size validation).
* ``load_text_folder(folder, max_features=2000)``: every ``*.txt`` file below ``folder`` is one document, counted
  by scikit-learn's CountVectorizer (English stop words removed, the ``max_features`` most frequent words kept);
  files in first-level subfolders get the subfolder name as their class (``meta["class_names"]``).
  ``vectorize_texts`` + ``save_bow_npz`` write the matrix once, so a run can refer to the .npz file.

Counts must be non-negative integers; binarization does not apply to counts (only binarize="none").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from elbolab.data.core import (
    DataSplits,
    TensorData,
    ValSize,
    check_binarize,
    check_seed,
    resolve_val_count,
    rows_to_split,
    seeded_generator,
    split_three_ways,
)
from elbolab.data.registry import register_source
from elbolab.errors import DataError

FEAT_FILES = ("train.feat", "test.feat")
VOCAB_FILE = "vocab.new"
DEFAULT_VAL_SIZE = 1000  # 20news: validation documents drawn from train.feat
FILE_VAL_SIZE = 0.15  # .npz and text folders, as for array files
DEFAULT_MAX_FEATURES = 2000  # the vocabulary size of the NVDM paper's 20News experiments
TEXT_SUFFIX = ".txt"
NEWSGROUPS_FILE = "newsgroups.txt"  # optional: the newsgroup name of each label value, in increasing order
# The 20 newsgroups in alphabetical order: the folders of 20news-bydate, scikit-learn's fetch_20newsgroups target_names.
NEWSGROUPS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware",
    "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey",
    "sci.crypt", "sci.electronics", "sci.med", "sci.space", "soc.religion.christian", "talk.politics.guns",
    "talk.politics.mideast", "talk.politics.misc", "talk.religion.misc",
)


def _check_counts_binarize(binarize: str, where) -> None:
    check_binarize(binarize)
    if binarize != "none":
        raise DataError(f"{where} holds word counts: binarize={binarize!r} does not apply to counts (it reads values "
                        "in [0, 1] as probabilities); use binarize='none'")


def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """The words of a vocabulary file, one per line (the first whitespace-separated token; later tokens, such as
    the counts in vocab.new, are ignored). Blank lines and repeated words are errors naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"could not read the vocabulary file {path} ({error})") from None
    words: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            raise DataError(f"{path} line {number} is blank: expected one word per line")
        word = parts[0]
        if word in seen:
            raise DataError(f"{path} line {number} repeats the word {word!r} of line {seen[word]}: expected each "
                            "word once")
        seen[word] = number
        words.append(word)
    if not words:
        raise DataError(f"{path} is empty: expected one word per line")
    return words


def read_feat(path: str | os.PathLike, vocab_size: int, vocab_name: str = VOCAB_FILE):
    """Documents of a ``label id:count ...`` file as (CSR float32 counts [N, vocab_size], int64 labels [N]).

    Word ids count from 1 (id k is line k of the vocabulary file). A malformed line raises a DataError naming the
    file and the line (counted from 1). A document with no words (a line holding only its label) is kept.
    """
    import scipy.sparse

    path = Path(path)
    indptr, indices, counts, labels = [0], [], [], []
    try:
        stream = open(path, encoding="utf-8")
    except OSError as error:
        raise DataError(f"could not read {path} ({error.strerror or error})") from None
    with stream:
        try:
            for number, line in enumerate(stream, start=1):
                parts = line.split()
                where = f"{path} line {number}"
                if not parts:
                    raise DataError(f"{where} is blank: expected 'label id:count id:count ...'")
                try:
                    labels.append(int(parts[0]))
                except ValueError:
                    raise DataError(f"{where}: the label {parts[0]!r} is not an integer; expected "
                                    "'label id:count id:count ...'") from None
                seen: set[int] = set()
                for token in parts[1:]:
                    word, _, count = token.partition(":")
                    try:
                        word_id, value = int(word), int(count)
                    except ValueError:
                        raise DataError(f"{where}: {token!r} is not 'id:count' with integers; expected "
                                        "'label id:count id:count ...'") from None
                    if not 1 <= word_id <= vocab_size:
                        raise DataError(f"{where}: word id {word_id} is outside 1..{vocab_size}, the lines of "
                                        f"{vocab_name} (ids count from 1)")
                    if value < 1:
                        raise DataError(f"{where}: word id {word_id} has count {value}; expected a count >= 1")
                    if word_id in seen:
                        raise DataError(f"{where}: word id {word_id} appears twice; expected each id once per line")
                    seen.add(word_id)
                    indices.append(word_id - 1)
                    counts.append(value)
                indptr.append(len(indices))
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text ({error}); expected 'label id:count ...' lines") from None
    if not labels:
        raise DataError(f"{path} is empty: expected one 'label id:count id:count ...' line per document")
    x = scipy.sparse.csr_matrix(
        (np.asarray(counts, dtype=np.float32), np.asarray(indices, dtype=np.int32), np.asarray(indptr, dtype=np.int64)),
        shape=(len(labels), vocab_size),
    )
    x.sort_indices()
    return x, torch.tensor(labels, dtype=torch.int64)


def find_20news_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding train.feat, test.feat and vocab.new: data_dir, data_dir/20news, then
    $ELBOLAB_DATA/20news. Nothing is downloaded."""
    needed = (*FEAT_FILES, VOCAB_FILE)
    candidates: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data_dir {root} is not an existing folder; expected a folder holding "
                            f"{', '.join(needed)} (or a 20news subfolder with them)")
        candidates += [root, root / "20news"]
    env = os.environ.get("ELBOLAB_DATA", "").strip()
    if env:
        candidates.append(Path(env).expanduser() / "20news")
    for folder in candidates:
        present = [name for name in needed if (folder / name).is_file()]
        if len(present) == len(needed):
            return folder
        if present:
            missing = [name for name in needed if name not in present]
            raise DataError(f"20news folder {folder} lacks {', '.join(missing)}: expected {', '.join(needed)}")
    searched = "; ".join(str(c) for c in candidates) or "nothing (no --data-dir and no ELBOLAB_DATA)"
    raise DataError(f"20news files {', '.join(needed)} not found; searched {searched}. Put them into DIR/20news and "
                    "pass --data-dir DIR (data_dir=DIR) or set ELBOLAB_DATA=DIR")


def newsgroup_labels(y_train: torch.Tensor, y_test: torch.Tensor, folder: Path):
    """(train labels, test labels, meta) of the .feat label values: class ids 0..C-1 in increasing order of the
    values, with their newsgroup names (module docstring); (None, None, a note) when every document carries the same
    label (the NVDM files' placeholder 1), which says nothing about its newsgroup."""
    values = torch.cat([y_train, y_test]).unique()  # sorted
    if len(values) == 1:
        note = f"the 20news files label every document {int(values[0])}, a placeholder, not its newsgroup"
        return None, None, {"labels_note": note}
    names_path = folder / NEWSGROUPS_FILE
    if names_path.is_file():
        try:
            names = [line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"could not read {names_path} ({error})") from None
        if len(names) != len(values):
            raise DataError(f"{names_path} names {len(names)} newsgroups but the .feat files hold {len(values)} label "
                            f"values ({', '.join(str(int(v)) for v in values[:25])}): expected one name per line for "
                            "each label value, in increasing order")
    elif len(values) == len(NEWSGROUPS):
        names = list(NEWSGROUPS)
    else:
        names = [str(int(v)) for v in values]
    meta = {"class_names": names, "label_name": "newsgroup", "label_values": [int(v) for v in values]}
    return torch.searchsorted(values, y_train), torch.searchsorted(values, y_test), meta


@register_source("20news")
def load_20news(*, data_dir=None, binarize: str = "none", seed: int = 0,
                val_size: ValSize = DEFAULT_VAL_SIZE) -> DataSplits:
    """20 Newsgroups as in the NVDM paper: train.feat split by seed into train and validation (val_size: a count or
    a fraction of train.feat), test = test.feat; word counts as sparse CSR, vocabulary in meta."""
    _check_counts_binarize(binarize, "20news")
    seed = check_seed(seed)
    folder = find_20news_dir(data_dir)
    vocabulary = read_vocabulary(folder / VOCAB_FILE)
    x_train, y_train = read_feat(folder / "train.feat", len(vocabulary))
    x_test, y_test = read_feat(folder / "test.feat", len(vocabulary))
    y_train, y_test, label_meta = newsgroup_labels(y_train, y_test, folder)
    n = x_train.shape[0]
    n_val = resolve_val_count(val_size, n, n - 1, f"20news ({n} training documents)")
    order = torch.randperm(n, generator=seeded_generator(seed, "split"))
    val_index, train_index = order[:n_val].sort().values, order[n_val:].sort().values
    meta = {"vocabulary": vocabulary, **label_meta}
    return DataSplits(
        train=rows_to_split("20news/train", x_train, y_train, train_index, None, binarize, meta=meta),
        val=rows_to_split("20news/val", x_train, y_train, val_index, None, binarize, meta=meta),
        test=TensorData(x=x_test, y=y_test, image_shape=None, binarize=binarize, name="20news/test",
                        source_index=torch.arange(x_test.shape[0]), meta=meta),
    )


def check_counts(x, where) -> None:
    """Word counts: finite, non-negative integers."""
    values = x.data if hasattr(x, "nnz") else np.asarray(x)
    if values.size and not (np.isfinite(values).all() and (values >= 0).all() and (values == np.round(values)).all()):
        bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
        raise DataError(f"{where}: expected word counts (non-negative integers), got {int(bad.sum())} other "
                        f"values (e.g. {values[bad][0]!r}); a bag-of-words likelihood needs counts, not weights "
                        "such as tf-idf")


def save_bow_npz(path: str | os.PathLike, x, vocabulary=None, y=None) -> Path:
    """Write a document-term matrix (and its vocabulary, labels) as one .npz that ``load_bow_npz`` reads."""
    import scipy.sparse

    x = scipy.sparse.csr_matrix(x)
    arrays = {"format": np.array("csr"), "shape": np.array(x.shape), "data": x.data, "indices": x.indices,
              "indptr": x.indptr}
    if vocabulary is not None:
        arrays["vocabulary"] = np.array([str(w) for w in vocabulary])  # a unicode array: no pickle needed
    if y is not None:
        arrays["y"] = np.asarray(y)
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path


def _read_bow_npz(path: Path):
    import scipy.sparse

    hint = "save it with elbolab.data.bow.save_bow_npz(path, x, vocabulary) or scipy.sparse.save_npz"
    if not path.is_file():
        raise DataError(f"document-term matrix {path} not found; {hint}")
    try:
        x = scipy.sparse.load_npz(path).tocsr().astype(np.float32)
        with np.load(path, allow_pickle=False) as archive:
            vocabulary = [str(w) for w in archive["vocabulary"]] if "vocabulary" in archive.files else None
            y = next((archive[k] for k in ("y", "labels") if k in archive.files), None)
    except (ValueError, OSError, KeyError, EOFError) as error:
        raise DataError(f"could not read {path} as a sparse document-term matrix ({error}); {hint}") from None
    if vocabulary is None:
        sibling = path.with_name(path.stem + ".vocab.txt")
        if sibling.is_file():
            vocabulary = read_vocabulary(sibling)
    return x, vocabulary, y


def _finish(prefix: str, x, vocabulary, y, where, *, binarize, seed, val_size, **meta) -> DataSplits:
    check_counts(x, where)
    if vocabulary is None:
        vocabulary = [f"w{j}" for j in range(x.shape[1])]
    if len(vocabulary) != x.shape[1]:
        raise DataError(f"{where}: the vocabulary has {len(vocabulary)} words but the matrix {x.shape[1]} columns; "
                        "expected one word per column")
    if len(set(vocabulary)) != len(vocabulary):
        raise DataError(f"{where}: the vocabulary repeats words; expected each word once")
    labels = None
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: expected {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
        labels = torch.from_numpy(y.astype(np.int64))
    return split_three_ways(prefix, x, labels, None, binarize=binarize, seed=check_seed(seed), val_size=val_size,
                            meta={"vocabulary": list(vocabulary), **meta})


def load_bow_npz(path: str | os.PathLike, *, binarize: str = "none", seed: int = 0,
                 val_size: ValSize = FILE_VAL_SIZE) -> DataSplits:
    """A sparse document-term matrix file (see the module docstring), split 15% test / val_size / rest."""
    path = Path(path).expanduser()
    _check_counts_binarize(binarize, path)
    x, vocabulary, y = _read_bow_npz(path)
    return _finish(path.stem, x, vocabulary, y, path, binarize=binarize, seed=seed, val_size=val_size)


def text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{TEXT_SUFFIX}") if p.is_file())


def vectorize_texts(folder: str | os.PathLike, *, max_features: int | None = DEFAULT_MAX_FEATURES,
                    stop_words: str | None = "english"):
    """Count the words of every *.txt file below ``folder`` (sorted paths, one document each) with scikit-learn's
    CountVectorizer: returns (CSR float32 counts [N, V], vocabulary [V], labels [N] or None, class names or None).
    Files in first-level subfolders are labelled by the subfolder (sorted names, ids from 0)."""
    from sklearn.feature_extraction.text import CountVectorizer

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"text folder {folder} is not an existing folder; expected a folder of {TEXT_SUFFIX} files")
    if max_features is not None and (isinstance(max_features, bool) or not isinstance(max_features, int)
                                     or max_features < 1):
        raise DataError(f"expected max_features as a positive integer (or None for every word), got {max_features!r}")
    files = text_files(folder)
    if len(files) < 3:
        raise DataError(f"{folder} holds {len(files)} {TEXT_SUFFIX} file(s): expected at least 3 documents "
                        "(one each for the train, validation and test splits)")
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    vectorizer = CountVectorizer(max_features=max_features, stop_words=stop_words)
    try:
        x = vectorizer.fit_transform(texts).astype(np.float32).tocsr()
    except ValueError as error:  # "empty vocabulary"
        raise DataError(f"no words found in the {TEXT_SUFFIX} files of {folder} ({error})") from None
    vocabulary = [str(w) for w in vectorizer.get_feature_names_out()]
    groups = [p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None for p in files]
    if all(g is not None for g in groups) and len(set(groups)) > 1:
        class_names = sorted(set(groups))
        labels = np.array([class_names.index(g) for g in groups], dtype=np.int64)
        return x, vocabulary, labels, class_names
    return x, vocabulary, None, None


def load_text_folder(folder: str | os.PathLike, *, max_features: int | None = DEFAULT_MAX_FEATURES,
                     stop_words: str | None = "english", binarize: str = "none", seed: int = 0,
                     val_size: ValSize = FILE_VAL_SIZE) -> DataSplits:
    """A folder of text files as a bag of words (``vectorize_texts``), split 15% test / val_size / rest."""
    folder = Path(folder).expanduser()
    _check_counts_binarize(binarize, folder)
    x, vocabulary, labels, class_names = vectorize_texts(folder, max_features=max_features, stop_words=stop_words)
    meta = {"class_names": class_names} if class_names else {}
    return _finish(folder.name, x, vocabulary, labels, folder, binarize=binarize, seed=seed, val_size=val_size,
                   **meta)


def is_bow_path(path: str | os.PathLike) -> bool:
    """Whether ``load_bow_path`` reads this path: a folder (of .feat files or text files) or a sparse .npz."""
    path = Path(path).expanduser()
    if path.is_dir():
        return True
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {"indptr", "indices", "data", "shape"} <= set(archive.files) or "row" in archive.files
    except (ValueError, OSError, EOFError):
        return False


def load_bow_path(path: str | os.PathLike, *, binarize: str = "none", seed: int = 0,
                  val_size: ValSize | None = None) -> DataSplits:
    """A folder holding the 20news files, a folder of text files, or a sparse .npz document-term matrix."""
    path = Path(path).expanduser()
    options = {"binarize": binarize, "seed": seed}
    if path.is_dir() and all((path / name).is_file() for name in (*FEAT_FILES, VOCAB_FILE)):
        return load_20news(data_dir=path, val_size=DEFAULT_VAL_SIZE if val_size is None else val_size, **options)
    val_size = FILE_VAL_SIZE if val_size is None else val_size
    if path.is_dir():
        return load_text_folder(path, val_size=val_size, **options)
    return load_bow_npz(path, val_size=val_size, **options)
