"""NVDM: the document likelihood, perplexity, log p(d) against quadrature, training and alternation, topics."""

import html
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import write_bow_corpus
from torch.distributions import Categorical, Multinomial

from elbolab import loading, pipeline, plots, runs, topics
from elbolab.data import load_data
from elbolab.data.bow import NEWSGROUPS
from elbolab.errors import ElbolabError
from elbolab.estimators import importance_sampled_log_px
from elbolab.figures.standard import standard_figures
from elbolab.models.nvdm import NVDM, NVDMConfig, WordSequence, perplexity

V, K = 12, 3


def write_corpus(folder, n_train=60, n_test=20, seed=0):
    """Documents from two planted topics over V words (ids from 1), in the 20news format."""
    return write_bow_corpus(folder, n_train, n_test, V, seed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("bow") / "20news")


OPTIONS = dict(latent_dim=K, hidden=(16,), batch_size=16, progress=False, tensorboard=False, val_size=10)


def test_word_sequence_log_prob_is_a_sum_over_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 7)  # [B, V]
    counts = torch.tensor([[2.0, 0, 1, 0, 0, 3, 0], [0, 0, 0, 0, 0, 0, 0], [1.0, 1, 1, 1, 1, 1, 5]])
    got = WordSequence(logits).log_prob(counts)  # [B]
    for b in range(3):  # brute force: every token of the document, one Categorical draw each
        tokens = torch.repeat_interleave(torch.arange(7), counts[b].long())
        brute = Categorical(logits=logits[b]).log_prob(tokens).sum()
        assert torch.allclose(got[b], brute, atol=1e-5)
    # torch's Multinomial adds the multinomial coefficient log(N! / prod c!)
    coefficient = torch.lgamma(counts.sum(-1) + 1) - torch.lgamma(counts + 1).sum(-1)
    multinomial = torch.stack([Multinomial(int(c.sum()), logits=logits[b]).log_prob(c) for b, c in enumerate(counts)])
    assert torch.allclose(got, multinomial - coefficient, atol=1e-4)
    assert coefficient[0] > 0  # so the two differ on documents with several distinct words


def test_perplexity_formula_on_a_constructed_case():
    # a uniform model over 50 words: log p(d) = -N_d log 50, so both perplexities are exactly 50
    n = torch.tensor([10.0, 3.0, 0.0, 7.0])
    uniform = perplexity(-n * math.log(50), n)
    assert uniform["per_document"] == pytest.approx(50) and uniform["corpus"] == pytest.approx(50)
    assert (uniform["documents"], uniform["empty_documents"], uniform["words"]) == (3, 1, 20)
    # two documents: per document exp(mean(2, 1)) = e^1.5; corpus exp((2*4 + 1*2) / 6) = e^(10/6)
    two = perplexity(torch.tensor([-8.0, -2.0]), torch.tensor([4.0, 2.0]))
    assert two["per_document"] == pytest.approx(math.exp(1.5)) and two["corpus"] == pytest.approx(math.exp(10 / 6))


def test_importance_sampled_log_pd_matches_quadrature_and_exceeds_the_elbo(corpus):
    """One latent dimension: log p(d) = log int N(h; 0, 1) p(d|h) dh by quadrature on a fine grid is the reference;
    the IS estimate must approach it and the ELBO stay below it."""
    torch.manual_seed(0)
    splits = load_data("20news", data_dir=corpus, val_size=10)
    model = NVDM(NVDMConfig.from_data(splits.train, latent_dim=1, hidden=(8,))).double()
    with torch.no_grad():
        model.decoder.weight.copy_(torch.linspace(-2, 2, V).double()[:, None])  # strong word-h dependence
    x = splits.test.batch(torch.arange(len(splits.test))).x.double()  # [N, V]
    grid = torch.linspace(-10, 10, 20001, dtype=torch.float64)[:, None]  # [G, 1]
    with torch.no_grad():
        log_joint = model.decode(grid[:, None, :]).log_prob(x) + model.prior().log_prob(grid)[:, None]  # [G, N]
        exact = torch.logsumexp(log_joint, 0) + math.log(grid[1, 0] - grid[0, 0])  # [N]
        estimate = importance_sampled_log_px(model, x, k=30000).per_example  # [N]; a crude q: many samples
        elbo = model.document_elbo(pipeline_batch(x), samples=2000)
    assert torch.allclose(estimate, exact, atol=0.05)
    assert (elbo <= exact + 0.05).all() and elbo.mean() < estimate.mean() - 0.01


def pipeline_batch(x):
    from elbolab.data.core import Batch

    return Batch(x)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "nvdm"
    pipeline.train("nvdm", "20news", out=out, data_dir=corpus, epochs=3, figures=True, **OPTIONS)
    return out


def test_training_evaluation_and_files(trained):
    records, _ = runs.read_metrics(trained / runs.METRICS)
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["elbo"]) and "loss_encoder" in r for r in train)
    assert (trained / "vocabulary.txt").read_text().split() == [f"word{j}" for j in range(V)]
    assert len((trained / "topics.txt").read_text().split("\n")) > K
    assert not (trained / "figures" / "topics.png").exists()  # words are text in the report, not a picture
    result = pipeline.evaluate(trained, k=50, refresh_report=False)
    metrics = result["model_metrics"]
    assert metrics["documents"] == 20 and metrics["empty_documents_left_out"] == 0
    assert 1 < metrics["perplexity_is"] < V * 2 and math.isfinite(metrics["perplexity_elbo"])
    assert result["log_px"]["is_density"]


def initial_and_trained(corpus, tmp_path, steps, updates):
    """Weights before and after ``steps`` optimiser steps (one batch per epoch), trained by pipeline.train."""
    options = {**OPTIONS, "batch_size": 64, "val_size": 10}  # 50 training documents: one batch per epoch
    out = pipeline.train("nvdm", "20news", out=tmp_path / updates, data_dir=corpus, epochs=steps, figures=False,
                         updates=updates, **options)
    torch.manual_seed(0)  # pipeline.train seeds the initial weights with the training seed (0)
    splits = load_data("20news", data_dir=corpus, val_size=10)
    initial = NVDM(NVDMConfig.from_data(splits.train, latent_dim=K, hidden=(16,), updates=updates))
    return initial.state_dict(), loading.load_run(out)[0].state_dict()


def changed(before, after, prefix):
    return {name: not torch.equal(before[name], after[name]) for name in before if name.startswith(prefix)}


def test_alternate_updates_rest_one_group_per_step(corpus, tmp_path):
    before, after = initial_and_trained(corpus, tmp_path, 1, "alternate")  # step 0: decoder only
    assert all(changed(before, after, "decoder").values())
    assert not any(changed(before, after, "encoder").values())
    before, after = initial_and_trained(corpus, tmp_path / "two", 2, "alternate")  # step 1: the encoder's turn
    assert all(changed(before, after, "encoder").values())
    model = NVDM(NVDMConfig(input_dim=V, latent_dim=K, updates="alternate", alternate_every=3))
    assert [model.phase(s) for s in range(7)] == ["decoder"] * 3 + ["encoder"] * 3 + ["decoder"]


def test_joint_updates_move_both_groups(corpus, tmp_path):
    before, after = initial_and_trained(corpus, tmp_path, 1, "joint")
    assert all(changed(before, after, "decoder").values()) and all(changed(before, after, "encoder").values())


def planted_model():
    """Six words with planted vectors R_w: a* along h0 (a0 strongest), b* along h1, c* against h0."""
    vocabulary = ["a0", "a1", "a2", "b0", "b1", "c0"]
    model = NVDM(NVDMConfig(input_dim=6, latent_dim=2, hidden=(4,)))
    vectors = torch.tensor([[3.0, 0.1], [2.0, 0.3], [1.0, 0.0], [0.0, 2.0], [0.2, 1.5], [-2.0, 0.1]])
    with torch.no_grad():
        model.decoder.weight.copy_(vectors)
    return model, vocabulary, vectors


def test_top_words_and_neighbours_on_planted_vectors():
    model, vocabulary, vectors = planted_model()
    assert topics.top_words(model, vocabulary, top=3) == [(0, ["a0", "a1", "a2"]), (1, ["b0", "b1", "a1"])]
    near = topics.nearest_words(model, vocabulary, "a1", n=5)
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    cosine = (unit @ unit[1]).tolist()
    expected = sorted((i for i in range(6) if i != 1), key=lambda i: -cosine[i])
    assert [w for w, _ in near] == [vocabulary[i] for i in expected]
    assert [s for _, s in near] == pytest.approx([cosine[i] for i in expected], abs=1e-6)
    assert near[-1][0] == "c0"  # the opposite direction comes last
    with pytest.raises(ElbolabError, match="unknown word 'a00'.*close matches: a0"):
        topics.nearest_words(model, vocabulary, "a00")


def test_topics_and_neighbours_text_of_a_run(trained):
    lines = topics.topics(trained, top=4).splitlines()
    assert len(lines) == K and all(line.startswith(f"dim {j}: ") and len(line.split()) == 6
                                   for j, line in enumerate(lines))
    text = topics.neighbours(trained, ["word0", "word7"], n=3).splitlines()
    assert text[0].startswith("word0: ") and text[0].count("(") == 3 and text[1].startswith("word7: ")
    with pytest.raises(ElbolabError, match="unknown word 'wordd1'.*close matches: word1"):
        topics.neighbours(trained, ["word0", "wordd1"])


def test_a_plural_or_capitalised_word_finds_its_lemma_when_that_is_unambiguous(trained):
    assert topics.lemma_in("weapons", {"weapon", "medical"}) == "weapon"
    assert topics.lemma_in("Companies", {"company"}) == "company"
    assert topics.lemma_in("boxes", {"box", "boxe"}) == "boxes"  # two candidates: not guessed
    assert topics.lemma_in("israel", {"israel"}) == "israel"
    text = topics.neighbours(trained, ["Word0s"], n=2)
    assert text.startswith("Word0s (as 'word0'): ")
    assert topics.neighbours(trained, ["word0"], n=2).split(": ", 1)[1] == text.split(": ", 1)[1]


def test_report_topics_table_holds_each_dimensions_top_words_as_text(trained):
    """index.html's Topics section: one row per latent dimension, its top 10 words as text in a cell (the words of
    'elbolab topics'), its spread and, once evaluated, its KL; no picture of text."""
    pipeline.evaluate(trained, k=20, refresh_report=True)
    page = (trained / "index.html").read_text(encoding="utf-8")
    section = re.search(r'<section id="topics"><h2>Topics</h2>(.*?)</section>', page, re.S)
    assert section is not None
    rows = re.findall(r"<tr>(.*?)</tr>", section.group(1), re.S)
    header, body = rows[0], rows[1:]
    assert "Top 10 words" in header and "Spread of R_j" in header and "KL (nats)" in header
    model, vocabulary = topics.load_topic_model(trained)
    expected = {f"h{j}": " ".join(words) for j, words in topics.top_words(model, vocabulary, 10)}
    cells = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in body]
    assert len(cells) == K and {c[0] for c in cells} == set(expected)
    for dim, words, spread, kl in cells:
        assert words == expected[dim] and len(words.split()) == 10
        assert float(spread) > 0 and float(kl) >= 0
    spreads = [float(c[2]) for c in cells]
    assert spreads == sorted(spreads, reverse=True)  # the dimensions the decoder uses most first
    saved = json.loads((trained / "topics.json").read_text())
    assert [f"h{t['dim']}" for t in saved["topics"]] == [c[0] for c in cells]


def test_latent_scatter_is_coloured_by_newsgroup_with_a_legend_of_names(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "20news", n_train=60, n_test=38)
    for name in ("train.feat", "test.feat"):  # the newsgroups 1..20 (the conftest corpus labels every document 1)
        lines = (folder / name).read_text().splitlines()
        (folder / name).write_text("".join(f"{i % 20 + 1} {line.partition(' ')[2]}\n" for i, line in enumerate(lines)))
    splits = load_data("20news", data_dir=folder, val_size=10)
    present = sorted(set(splits.test.y.tolist()))
    assert len(present) == 20
    keep = splits.test.y != 3  # leave one newsgroup out of the test split: the others keep their colours
    splits.test.y, splits.test.x = splits.test.y[keep], splits.test.x[keep.numpy()]
    splits.test.source_index = splits.test.source_index[keep]
    figures = {}

    def keep_figure(fig, path, original=plots.save_figure):
        ax = fig.axes[0]
        legend = ax.get_legend()
        figures[Path(path).name] = (
            legend.get_title().get_text() if legend else None,
            [t.get_text() for t in legend.get_texts()] if legend else [],
            [tuple(c.get_facecolor()[0]) for c in ax.collections if len(c.get_offsets())])
        return original(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep_figure)
    model = NVDM(NVDMConfig.from_data(splits.train, latent_dim=K, hidden=(16,)))
    standard_figures(model, tmp_path / "run", splits)
    title, entries, colours = figures["latent_scatter.png"]
    names = [e.rsplit(" (", 1)[0] for e in entries]  # "rec.sport.hockey (2)": the name and its number of codes
    assert title.startswith("newsgroup")
    assert names == [NEWSGROUPS[g] for g in range(20) if g != 3]  # every newsgroup present, by name, none absent
    assert len(colours) == 19 and len(set(colours)) == 19  # one colour per newsgroup present
    palette = plots.class_colours(20)
    assert colours[3][:3] == pytest.approx(palette[4][:3])  # the colour of newsgroup 4 does not shift to 3's


def test_latent_scatter_says_why_it_is_not_coloured_for_the_nvdm_files(corpus, tmp_path, monkeypatch):
    splits = load_data("20news", data_dir=corpus, val_size=10)  # every document labelled 1, as the NVDM files
    assert splits.test.y is None
    titles = {}

    def keep_title(fig, path, original=plots.save_figure):
        titles[Path(path).name] = fig.axes[0].get_title()
        return original(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep_title)
    standard_figures(NVDM(NVDMConfig.from_data(splits.train, latent_dim=K, hidden=(16,))), tmp_path / "run", splits)
    assert "not coloured by label" in titles["latent_scatter.png"]
    assert "every document 1" in titles["latent_scatter.png"]
