"""NVDM: the document likelihood, perplexity, log p(d) against quadrature, training and alternation, topics."""

import math

import pytest
import torch
from conftest import write_bow_corpus
from torch.distributions import Categorical, Multinomial

from elbolab import loading, pipeline, runs, topics
from elbolab.data import load_data
from elbolab.errors import ElbolabError
from elbolab.estimators import importance_sampled_log_px
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
    assert (trained / "figures" / "topics.png").is_file() and len((trained / "topics.txt").read_text().split("\n")) > K
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
