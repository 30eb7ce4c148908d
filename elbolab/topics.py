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
from elbolab.figures.topics import VOCABULARY_FILE, format_topics, top_words, word_vectors
from elbolab.loading import load_run, load_run_data


def load_topic_model(run_dir):
    """(model, vocabulary) of a run folder; the vocabulary from vocabulary.txt or the run's data source."""
    model, config = load_run(run_dir)
    vectors = word_vectors(model)
    path = Path(run_dir) / VOCABULARY_FILE
    if path.is_file():
        vocabulary = path.read_text(encoding="utf-8").splitlines()
    else:
        try:
            vocabulary = load_run_data(config["data"]).train.meta.get("vocabulary")
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


def lemma_in(word: str, vocabulary) -> str:
    """``word`` if the vocabulary has it, else the one vocabulary word it is a plain inflection of (a lemmatised
    vocabulary such as 20 Newsgroups' holds "weapon", not "weapons"): -s, -es, -ies -> -y, lower case. Unchanged
    when there is no such word, or more than one."""
    if word in vocabulary:
        return word
    lower = word.lower()
    candidates = {c for c in (lower, lower[:-1] if lower.endswith("s") else None,
                              lower[:-2] if lower.endswith("es") else None,
                              lower[:-3] + "y" if lower.endswith("ies") else None) if c and c in vocabulary}
    return candidates.pop() if len(candidates) == 1 else word


def nearest_words(model, vocabulary, word: str, n: int = 5) -> list[tuple[str, float]]:
    """The ``n`` words whose vectors have the largest cosine similarity with ``word``'s, with the similarities.
    An unknown word raises ElbolabError listing close matches."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ElbolabError(f"expected -n as a positive integer, got {n!r}")
    index = {w: i for i, w in enumerate(vocabulary)}
    word = lemma_in(word, index)
    if word not in index:
        close = difflib.get_close_matches(word, vocabulary, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise ElbolabError(f"unknown word {word!r}: not in the run's vocabulary of {len(vocabulary)} words; {hint}")
    vectors = torch.nn.functional.normalize(word_vectors(model), dim=1)  # [V, K], unit rows
    similarity = vectors @ vectors[index[word]]  # [V]
    similarity[index[word]] = -float("inf")
    values, order = similarity.topk(min(n, len(vocabulary) - 1))
    return [(vocabulary[int(i)], float(v)) for v, i in zip(values, order)]


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
    index = set(vocabulary)
    shown = [w if lemma_in(w, index) == w else f"{w} (as {lemma_in(w, index)!r})" for w in words]
    return "\n".join(format_neighbours(w, rows) for w, rows in zip(shown, results))
