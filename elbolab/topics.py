"""What a document model's word vectors say: top words per latent dimension and nearest words (NVDM, notes 004).

The NVDM decoder is p(w|h) = softmax(R^T h + b) (Miao, Yu & Blunsom 2016); column w of R is word w's vector R_w
(``model.word_vectors()`` [V, K]). Two readings, as in the paper's tables (notes 004):

* topics: for latent dimension j, the words with the largest R_jw (raising h_j raises their logits most);
* neighbours: the words whose vectors R_v have the largest cosine similarity with R_w.

``topics(run_dir, top=10)`` and ``neighbours(run_dir, words, n=5)`` return the text ``elbolab topics`` and
``elbolab neighbours`` print. The vocabulary comes from RUN/vocabulary.txt (written during training), else from the
run's data source.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from elbolab.errors import ElbolabError

VOCABULARY_FILE = "vocabulary.txt"
FIGURE_DIMS = 16  # dimensions shown in figures/topics.png
FIGURE_WORDS = 8


def write_vocabulary(run_dir, vocabulary) -> Path:
    """RUN/vocabulary.txt, one word per line (column order); left as is when it already holds these words."""
    path = Path(run_dir) / VOCABULARY_FILE
    text = "".join(f"{w}\n" for w in vocabulary)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def _word_vectors(model) -> torch.Tensor:
    if not hasattr(model, "word_vectors"):
        raise ElbolabError(f"expected a document model with word vectors (nvdm), got {type(model).__name__}; "
                           "train one with 'elbolab train nvdm --data 20news'")
    return model.word_vectors().detach().float().cpu()  # [V, K]


def load_topic_model(run_dir):
    """(model, vocabulary) of a run folder; the vocabulary from vocabulary.txt or the run's data source."""
    from elbolab import runs

    model, config = runs.load_run(run_dir)
    vectors = _word_vectors(model)
    path = Path(run_dir) / VOCABULARY_FILE
    if path.is_file():
        vocabulary = path.read_text(encoding="utf-8").splitlines()
    else:
        from elbolab.pipeline import _load_splits

        try:
            vocabulary = _load_splits(config["data"]).train.meta.get("vocabulary")
        except ElbolabError as error:
            raise ElbolabError(f"{run_dir} has no {VOCABULARY_FILE} and its data could not be loaded ({error})") \
                from None
        if vocabulary is None:
            raise ElbolabError(f"{run_dir} has no {VOCABULARY_FILE} and its data have no vocabulary; expected a run "
                               "trained on a bag of words (e.g. --data 20news)")
    if len(vocabulary) != vectors.shape[0]:
        raise ElbolabError(f"{path}: {len(vocabulary)} words for a model over {vectors.shape[0]}; expected one word "
                           "per column of the training data")
    return model, list(vocabulary)


def top_words(model, vocabulary, top: int = 10, dims=None) -> list[tuple[int, list[str]]]:
    """(j, the ``top`` words with the largest R_jw, largest first) for each latent dimension j (all by default)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ElbolabError(f"expected --top as a positive integer, got {top!r}")
    vectors = _word_vectors(model)  # [V, K]
    dims = range(vectors.shape[1]) if dims is None else dims
    order = vectors.argsort(dim=0, descending=True)[: min(top, len(vocabulary))]  # [top, K]
    return [(int(j), [vocabulary[int(i)] for i in order[:, j]]) for j in dims]


def nearest_words(model, vocabulary, word: str, n: int = 5) -> list[tuple[str, float]]:
    """The ``n`` words whose vectors have the largest cosine similarity with ``word``'s, with the similarities.
    An unknown word raises ElbolabError listing close matches."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ElbolabError(f"expected -n as a positive integer, got {n!r}")
    index = {w: i for i, w in enumerate(vocabulary)}
    if word not in index:
        close = difflib.get_close_matches(word, vocabulary, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise ElbolabError(f"unknown word {word!r}: not in the run's vocabulary of {len(vocabulary)} words; {hint}")
    vectors = torch.nn.functional.normalize(_word_vectors(model), dim=1)  # [V, K], unit rows
    similarity = vectors @ vectors[index[word]]  # [V]
    similarity[index[word]] = -float("inf")
    values, order = similarity.topk(min(n, len(vocabulary) - 1))
    return [(vocabulary[int(i)], float(v)) for v, i in zip(values, order)]


def format_topics(rows: list[tuple[int, list[str]]]) -> str:
    width = len(str(max((j for j, _ in rows), default=0)))
    return "\n".join(f"dim {j:>{width}}: {' '.join(words)}" for j, words in rows)


def format_neighbours(word: str, rows: list[tuple[str, float]]) -> str:
    return f"{word}: " + ", ".join(f"{w} ({s:.3f})" for w, s in rows)


def topics(run_dir, top: int = 10) -> str:
    """One line per latent dimension: ``dim J: w1 w2 ... wTOP`` (largest R_jw first)."""
    model, vocabulary = load_topic_model(run_dir)
    return format_topics(top_words(model, vocabulary, top))


def neighbours(run_dir, words, n: int = 5) -> str:
    """One line per query word: ``word: w1 (cos), w2 (cos), ...``, nearest first; unknown words fail before any
    output, naming close matches."""
    model, vocabulary = load_topic_model(run_dir)
    words = [words] if isinstance(words, str) else list(words)
    if not words:
        raise ElbolabError("expected at least one word, e.g. 'elbolab neighbours RUN weapon medical'")
    results = [nearest_words(model, vocabulary, w, n) for w in words]
    return "\n".join(format_neighbours(w, rows) for w, rows in zip(words, results))


def topic_figures(model, vocabulary, run_dir) -> list[Path]:
    """figures/topics.png (the top words of the FIGURE_DIMS dimensions whose R_j spread most) and topics.txt
    (every dimension's top 10 words)."""
    from elbolab import plots

    run_dir = Path(run_dir)
    vectors = _word_vectors(model)  # [V, K]
    text_path = run_dir / "topics.txt"
    text_path.write_text(format_topics(top_words(model, vocabulary, 10)) + "\n", encoding="utf-8")
    dims = vectors.std(dim=0).argsort(descending=True)[:FIGURE_DIMS].sort().values.tolist()
    rows = top_words(model, vocabulary, FIGURE_WORDS, dims)
    fig = plots.plt.figure(figsize=(11.0, 0.42 * len(rows) + 1.0))
    fig.suptitle(f"NVDM: top words (largest R_jw) of the {len(rows)} dimensions whose R_j spread most", fontsize=13)
    for i, (j, words) in enumerate(rows):
        fig.text(0.02, 1 - (i + 1.6) / (len(rows) + 2), f"h{j:<3d} " + "  ".join(words), fontsize=11,
                 family="monospace", va="center")
    return [plots._save(fig, run_dir / "figures" / "topics.png")]
