"""Text tables of a document model's word vectors (NVDM): the top words per latent dimension, as topics.txt (what
``elbolab topics`` prints) and topics.json (the report's Topics table: words as text, not a picture of text).

The NVDM decoder is p(w|h) = softmax(R^T h + b) (Miao, Yu & Blunsom 2016); column w of R is word w's vector R_w
(``model.word_vectors()`` [V, K]); for latent dimension j the top words are those with the largest R_jw.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from elbolab.errors import ElbolabError

VOCABULARY_FILE = "vocabulary.txt"
TOPICS_TEXT = "topics.txt"
TOPICS_JSON = "topics.json"  # read by the report (elbolab.report) for its Topics table
TOPIC_WORDS = 10


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


def word_vectors(model) -> torch.Tensor:
    if not hasattr(model, "word_vectors"):
        raise ElbolabError(f"expected a document model with word vectors (nvdm), got {type(model).__name__}; "
                           "train one with 'elbolab train nvdm --data 20news'")
    return model.word_vectors().detach().float().cpu()  # [V, K]


def top_words(model, vocabulary, top: int = 10, dims=None) -> list[tuple[int, list[str]]]:
    """(j, the ``top`` words with the largest R_jw, largest first) for each latent dimension j (all by default)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ElbolabError(f"expected --top as a positive integer, got {top!r}")
    vectors = word_vectors(model)  # [V, K]
    dims = range(vectors.shape[1]) if dims is None else dims
    order = vectors.argsort(dim=0, descending=True)[: min(top, len(vocabulary))]  # [top, K]
    return [(int(j), [vocabulary[int(i)] for i in order[:, j]]) for j in dims]


def format_topics(rows: list[tuple[int, list[str]]]) -> str:
    width = len(str(max((j for j, _ in rows), default=0)))
    return "\n".join(f"dim {j:>{width}}: {' '.join(words)}" for j, words in rows)


def topic_table(model, vocabulary, top: int = TOPIC_WORDS) -> list[dict]:
    """One record per latent dimension j, largest ``spread`` first: {"dim": j, "words": the ``top`` words with the
    largest R_jw, "spread": the s.d. of R_jw over the vocabulary (how much raising h_j reshapes p(w|h); a dimension
    the decoder ignores has a small spread and a noisy word list)}."""
    vectors = word_vectors(model)  # [V, K]
    spread = vectors.std(dim=0)  # [K]
    rows = top_words(model, vocabulary, top)
    return sorted(({"dim": j, "words": words, "spread": float(spread[j])} for j, words in rows),
                  key=lambda row: (-row["spread"], row["dim"]))


def topic_figures(model, vocabulary, run_dir) -> list[Path]:
    """topics.txt (every dimension's top 10 words, as ``elbolab topics``) and topics.json (the same with each
    dimension's spread, largest first), which the report shows as its Topics table. A figures/topics.png of an
    earlier version (the words drawn as an image) is removed."""
    run_dir = Path(run_dir)
    text_path = run_dir / TOPICS_TEXT
    text_path.write_text(format_topics(top_words(model, vocabulary, TOPIC_WORDS)) + "\n", encoding="utf-8")
    table = {"model": type(model).__name__, "top": TOPIC_WORDS,
             "about": "top words of each latent dimension j: the largest R_jw of the decoder p(w|h) = "
                      "softmax(R^T h + b); spread: s.d. of R_jw over the vocabulary",
             "topics": topic_table(model, vocabulary, TOPIC_WORDS)}
    json_path = run_dir / TOPICS_JSON
    json_path.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    (run_dir / "figures" / "topics.png").unlink(missing_ok=True)
    return [text_path, json_path]
