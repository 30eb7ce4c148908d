"""Figures and text tables of a document model's word vectors (NVDM): the top words per latent dimension.

The NVDM decoder is p(w|h) = softmax(R^T h + b) (Miao, Yu & Blunsom 2016); column w of R is word w's vector R_w
(``model.word_vectors()`` [V, K]); for latent dimension j the top words are those with the largest R_jw.
"""

from __future__ import annotations

from pathlib import Path

import torch

from elbolab import plots
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


def topic_figures(model, vocabulary, run_dir) -> list[Path]:
    """figures/topics.png (the top words of the FIGURE_DIMS dimensions whose R_j spread most) and topics.txt
    (every dimension's top 10 words)."""
    run_dir = Path(run_dir)
    vectors = word_vectors(model)  # [V, K]
    text_path = run_dir / "topics.txt"
    text_path.write_text(format_topics(top_words(model, vocabulary, 10)) + "\n", encoding="utf-8")
    dims = vectors.std(dim=0).argsort(descending=True)[:FIGURE_DIMS].sort().values.tolist()
    rows = top_words(model, vocabulary, FIGURE_WORDS, dims)
    fig = plots.plt.figure(figsize=(11.0, 0.42 * len(rows) + 1.0))
    fig.suptitle(f"NVDM: top words (largest R_jw) of the {len(rows)} dimensions whose R_j spread most", fontsize=13)
    for i, (j, words) in enumerate(rows):
        fig.text(0.02, 1 - (i + 1.6) / (len(rows) + 2), f"h{j:<3d} " + "  ".join(words), fontsize=11,
                 family="monospace", va="center")
    return [plots.save_figure(fig, run_dir / "figures" / "topics.png")]
