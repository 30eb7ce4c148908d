"""VaDE (Jiang et al. 2017): the closed-form ELBO (eq. 17) against Monte Carlo and against the paper's equation term by
term, the bound against the marginal-mixture ELBO, the GMM initialisation on the encoder means, autoencoder
pretraining, training and clustering metrics through the pipeline, figures, and bad configurations."""

import math

import numpy as np
import pytest
import torch

from elbolab import loading, pipeline, runs
from elbolab.clustering import cluster_accuracy
from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.models import get_model_class
from elbolab.models.vade import COVARIANCE_FLOOR, VaDEConfig, cluster_log_posterior, vade_kl
from elbolab.schedules import StepContext

SMALL = dict(input_dim=6, latent_dim=3, hidden=(8,), n_clusters=4)


def small_model(seed=0, **options):
    torch.manual_seed(seed)
    model = get_model_class("vade")(VaDEConfig(**{**SMALL, **options}))
    with torch.no_grad():  # a prior that is not the initial one: spread means, unequal weights and variances
        model.mixture.means.mul_(1.5)
        model.mixture.log_var.uniform_(-1.0, 0.5)
        model.mixture.logits.uniform_(-1.0, 1.0)
        if model.config.gmm_covariance == "full":  # and correlated components
            model.mixture.lower.uniform_(-0.8, 0.8)
    return model


def fixed_log_gamma(batch_size, k, seed=1):
    """A q(c|x) that does not depend on z: random rows of probabilities, [B, K]."""
    return torch.randn(batch_size, k, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)


@pytest.mark.parametrize("covariance", ["diag", "full"])
@torch.no_grad()
def test_closed_form_kl_terms_match_monte_carlo_and_eq17(covariance):
    model = small_model(gmm_covariance=covariance)
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    q, prior = model.encode(x), model.prior()
    log_gamma = fixed_log_gamma(3, 4)
    kl_z, kl_c = vade_kl(q, prior, log_gamma)  # [B]
    closed = -(kl_z + kl_c)  # E_q(z,c|x)[log p(z, c) - log q(z, c|x)]

    # Monte Carlo over z ~ q(z|x) (exact sum over c) of the same expression
    torch.manual_seed(3)
    z = q.sample((200_000,))  # [S, B, d]
    log_pz_c = prior.component_distribution.log_prob(z.unsqueeze(-2))  # [S, B, K]
    log_pi = prior.mixture_distribution.logits  # [K]
    gamma = log_gamma.exp()
    per_sample = (gamma * (log_pz_c + log_pi - log_gamma)).sum(-1) - q.log_prob(z)  # [S, B]
    stderr = per_sample.std(0) / math.sqrt(z.shape[0])
    assert ((per_sample.mean(0) - closed).abs() < 5 * stderr + 1e-4).all()

    if covariance == "full":
        assert not torch.allclose(prior.component_distribution.covariance_matrix.tril(-1), torch.zeros(1))
        return
    # the paper's eq. 17 written out term by term (prior and entropy parts; the reconstruction term is shared)
    mu, var = q.mean.unsqueeze(1), q.variance.unsqueeze(1)  # [B, 1, d]
    mu_c, var_c = prior.component_distribution.mean, prior.component_distribution.variance  # [K, d]
    pi = log_pi.exp()
    eq17 = (-0.5 * (gamma * (var_c.log() + var / var_c + (mu - mu_c) ** 2 / var_c).sum(-1)).sum(-1)
            + (gamma * (pi.log() - log_gamma)).sum(-1) + 0.5 * (1 + q.variance.log()).sum(-1))
    assert torch.allclose(eq17, closed, atol=1e-5)


@pytest.mark.parametrize("covariance", ["diag", "full"])
@torch.no_grad()
def test_vade_elbo_lower_bounds_the_marginal_mixture_elbo_by_the_expected_kl(covariance):
    model = small_model(seed=4, gmm_covariance=covariance)
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(5))
    q, prior = model.encode(x), model.prior()
    log_gamma = fixed_log_gamma(3, 4, seed=6)
    vade_part = -sum(vade_kl(q, prior, log_gamma))  # [B], exact
    torch.manual_seed(7)
    z = q.sample((100_000,))  # [S, B, d]
    marginal = prior.log_prob(z) - q.log_prob(z)  # [S, B]: log p(z) - log q(z|x), p(z) the MixtureSameFamily
    gap = marginal.mean(0) - vade_part  # the reconstruction term is common to both ELBOs
    # independent draws for E_q KL(q(c|x) || p(c|z)) >= 0
    z2 = q.sample((100_000,))
    log_post = cluster_log_posterior(prior, z2)  # [S, B, K]
    kl_post = (log_gamma.exp() * (log_gamma - log_post)).sum(-1)  # [S, B]
    stderr = (marginal.std(0) ** 2 / z.shape[0] + kl_post.std(0) ** 2 / z2.shape[0]).sqrt()
    assert ((gap - kl_post.mean(0)).abs() < 5 * stderr + 1e-4).all()
    assert (gap > 5 * marginal.std(0) / math.sqrt(z.shape[0])).all()  # strictly below for this q(c|x)

    # the training objective (gamma = p(c|z) at each sample, as the paper) is below the marginal ELBO too
    torch.manual_seed(8)
    elbo = model.loss(Batch(x), StepContext(mc_samples=20_000)).metrics["elbo"]  # [B]
    torch.manual_seed(9)
    marginal_elbo = model.importance_samples(x, 20_000)[1]  # [S, B] log p(x, z) - log q(z|x), mixture prior
    se = marginal_elbo.std(0) / math.sqrt(20_000)
    assert (elbo < marginal_elbo.mean(0) + 3 * se).all()


@torch.no_grad()
def test_cluster_posterior_is_bayes_rule_of_the_mixture():
    model = small_model(seed=2)
    prior = model.prior()
    z = torch.randn(5, 7, 3)
    log_post = cluster_log_posterior(prior, z)  # [5, 7, K]
    for c in range(4):
        component = torch.distributions.Independent(
            torch.distributions.Normal(model.mixture.means[c], (0.5 * model.mixture.log_var[c]).exp()), 1)
        expected = component.log_prob(z) + model.mixture.logits.log_softmax(0)[c] - prior.log_prob(z)
        assert torch.allclose(log_post[..., c], expected, atol=1e-5)


@pytest.fixture(scope="module")
def digits():
    from elbolab.data import load_data

    return load_data("digits", seed=0).with_train_size(400)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_prepare_sets_the_prior_to_em_on_the_encoder_means(digits, covariance):
    from elbolab.classical import GaussianMixture

    torch.manual_seed(0)
    model = get_model_class("vade")(VaDEConfig(input_dim=64, latent_dim=3, hidden=(16,), n_clusters=5,
                                               gmm_covariance=covariance))
    train = digits.train
    torch.manual_seed(11)
    state = torch.get_rng_state()
    model.prepare(train, StepContext())
    torch.set_rng_state(state)
    seed = int(torch.randint(2**31 - 1, ()))  # the EM seed prepare drew
    with torch.no_grad():
        means = model.encode(train.batch(torch.arange(len(train))).x).mean.double().numpy()  # all at once
    floor = max(COVARIANCE_FLOOR * means.var(0).mean(), 1e-6)  # relative to the codes' own spread
    gmm = GaussianMixture(5, covariance_type=covariance, max_iter=200, random_state=seed, reg_covar=floor).fit(means)
    prior = model.prior()
    np.testing.assert_allclose(prior.component_distribution.mean.detach().numpy(), gmm.means_, rtol=1e-4, atol=1e-5)
    if covariance == "diag":
        np.testing.assert_allclose(prior.component_distribution.variance.detach().numpy(), gmm.covariances_, rtol=1e-4)
    else:  # the whole matrices, off-diagonal correlations included
        assert np.abs(gmm.covariances_ - np.diag(np.diag(gmm.covariances_[0]))[None]).max() > 1e-3
        np.testing.assert_allclose(prior.component_distribution.covariance_matrix.detach().numpy(),
                                   gmm.covariances_, rtol=1e-4, atol=1e-5 * np.abs(gmm.covariances_).max())
    np.testing.assert_allclose(prior.mixture_distribution.probs.detach().numpy(), gmm.weights_, rtol=1e-4)
    # and not on another set of codes: the prior means lie inside the cloud of encoder means
    assert np.abs(gmm.means_).max() <= np.abs(means).max()


@pytest.mark.parametrize("selection", ["likelihood", "information"])
def test_prepare_keeps_the_restart_chosen_by_likelihood_or_information(digits, selection):
    from elbolab.classical import GaussianMixture
    from elbolab.classical.information import mutual_information

    torch.manual_seed(0)
    model = get_model_class("vade")(VaDEConfig(input_dim=64, latent_dim=3, hidden=(16,), n_clusters=5,
                                               gmm_n_init=4, gmm_selection=selection))
    train = digits.train
    torch.manual_seed(5)
    state = torch.get_rng_state()
    model.prepare(train, StepContext())
    torch.set_rng_state(state)
    seed = int(torch.randint(2**31 - 1, ()))
    with torch.no_grad():
        means = model.encode(train.batch(torch.arange(len(train))).x).mean.double().numpy()
    rng = np.random.RandomState(seed)
    floor = max(COVARIANCE_FLOOR * means.var(0).mean(), 1e-6)
    fits = [GaussianMixture(5, covariance_type="diag", max_iter=200, random_state=rng, reg_covar=floor).fit(means)
            for _ in range(4)]
    information = [mutual_information(fit.predict_proba(means)) for fit in fits]
    likelihood = [fit.lower_bound_ for fit in fits]  # EM's n_init keeps the highest
    chosen = fits[int(np.argmax(information if selection == "information" else likelihood))]
    np.testing.assert_allclose(model.prior().component_distribution.mean.detach().numpy(), chosen.means_, rtol=1e-4,
                               atol=1e-5)
    assert np.argmax(information) != np.argmax(likelihood)  # the two criteria disagree here: the choice is tested


def test_load_pretrained_maps_an_autoencoder_encoder():
    config = dict(input_dim=64, latent_dim=3, hidden=(16, 8))
    torch.manual_seed(0)
    ae = get_model_class("autoencoder")(get_model_class("autoencoder").config_class(**config))
    vade = get_model_class("vade")(VaDEConfig(**config, n_clusters=3))
    loaded = vade.load_pretrained(ae.state_dict())
    assert "encoder.body.2.weight" in loaded and "encoder.loc.weight" in loaded and "decoder.0.weight" in loaded
    assert not any(name.startswith("encoder.log_var") or name.startswith("mixture") for name in loaded)
    x = torch.rand(5, 64)
    with torch.no_grad():
        assert torch.allclose(vade.encode(x).mean, ae.latent_means(x)["z"])
        assert torch.allclose(vade.decoder(x[:, :3]), ae.decoder(x[:, :3]))


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_training_from_a_pretrained_autoencoder_reports_clustering_metrics(tmp_path, covariance):
    common = dict(hidden=(32,), latent_dim=4, progress=False, tensorboard=False, train_size=300)
    ae = pipeline.train("autoencoder", "digits", out=tmp_path / "ae", epochs=2, figures=False, **common)
    run = pipeline.train("vade", "digits", out=tmp_path / "vade", epochs=2, init_from=ae, figures=True,
                         n_clusters=10, lr=2e-3, gmm_covariance=covariance, **common)
    tensors = runs.read_json(run / runs.CONFIG)["init_from"]["tensors"]
    assert "encoder.body.0.weight" in tensors and "encoder.loc.weight" in tensors
    records, _ = runs.read_metrics(run / runs.METRICS)
    assert all(math.isfinite(r["elbo"]) for r in records if "elbo" in r)
    result = pipeline.evaluate(run, k=10)
    metrics = result["model_metrics"]
    model, saved = loading.load_run(run)
    test = loading.load_run_data(saved["data"]).test
    assert metrics["accuracy"] == pytest.approx(cluster_accuracy(test.y, model.predict(test)))
    assert 0.1 <= metrics["accuracy"] <= 1 and -1 <= metrics["ari"] <= 1 and 0 <= metrics["nmi"] <= 1
    assert sum(metrics["cluster_sizes"]) == len(test) == metrics["n_examples"]
    names = {p.name for p in (run / runs.FIGURES).glob("*.png")}
    assert {"cluster_scatter.png", "cluster_samples.png", "cluster_confusion.png", "samples.png"} <= names
    # per-epoch snapshots (for the proposed trainer hook) become one figure
    from elbolab.figures.clusters import plot_latent_snapshots

    splits = loading.load_run_data(saved["data"])
    for epoch in (1, 2, 3):
        model.epoch_end(epoch, run, splits.val)
    assert plot_latent_snapshots(run, run / "figures" / "snaps.png").is_file()


def test_full_prior_starts_diagonal_and_accepts_variances_or_matrices():
    from elbolab.networks import MixturePrior

    torch.manual_seed(0)
    diag, full = MixturePrior(3, 2), MixturePrior(3, 2, covariance="full")
    full.load_state_dict({**diag.state_dict(), "lower": full.lower.detach()})
    z = torch.randn(50, 2)
    assert torch.allclose(full().log_prob(z), diag().log_prob(z), atol=1e-6)  # the same density at the start
    cov = torch.tensor([[[2.0, 0.6], [0.6, 1.0]]]).expand(3, 2, 2)
    full.set(torch.full((3,), 1 / 3), torch.zeros(3, 2), cov)
    assert torch.allclose(full().component_distribution.covariance_matrix, cov, atol=1e-6)
    full.set(torch.full((3,), 1 / 3), torch.zeros(3, 2), torch.ones(3, 2))  # variances: back to diagonal
    assert torch.allclose(full().component_distribution.covariance_matrix, torch.eye(2).expand(3, 2, 2))
    with pytest.raises(ElbolabError, match="diagonal mixture prior takes variances"):
        diag.set(torch.full((3,), 1 / 3), torch.zeros(3, 2), cov)
    with pytest.raises(ElbolabError, match="covariance diag or full"):
        MixturePrior(3, 2, covariance="tied")


@pytest.mark.parametrize("covariance", ["diag", "full"])
@torch.no_grad()
def test_sample_per_cluster_draws_row_c_from_component_c(covariance):
    model = small_model(seed=5, gmm_covariance=covariance)
    torch.manual_seed(0)
    decoded = model.sample_per_cluster(7)  # [K, n, D]
    torch.manual_seed(0)
    mu, tril = model.mixture.means, model.mixture.scale_tril()  # [K, d], [K, d, d]
    z = mu + (tril @ torch.randn(7, 4, 3, 1)).squeeze(-1)  # [n, K, d], the same draws
    for c in range(4):
        assert torch.allclose(decoded[c], model.decode_mean(z[:, c]), atol=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(n_clusters=1), "n_clusters >= 2"),
    (dict(encoder_covariance="full"), "encoder_covariance diag"),
    (dict(gmm_n_init=0), "gmm_n_init >= 1"),
    (dict(gmm_covariance="tied"), "gmm_covariance diag or full"),
    (dict(n_clusters=2.5), "n_clusters as int"),
])
def test_bad_config_is_refused_clearly(options, message):
    with pytest.raises(ElbolabError, match=message):
        VaDEConfig(**{**SMALL, **options})


def test_prepare_refuses_fewer_examples_than_clusters(digits):
    from dataclasses import replace

    model = get_model_class("vade")(VaDEConfig(input_dim=64, latent_dim=2, hidden=(8,), n_clusters=10))
    tiny = replace(digits.train, x=digits.train.x[:5], y=digits.train.y[:5], source_index=None)
    with pytest.raises(ElbolabError, match="at least n_clusters=10"):
        model.prepare(tiny, StepContext())


def test_cluster_scatter_gives_each_cluster_the_colour_of_its_matched_class(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from elbolab.figures import clusters as cluster_figs

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    permuted = np.array([2, 0, 1])[labels]  # cluster ids are the classes renamed: 0 -> 2, 1 -> 0, 2 -> 1
    permuted[:3] = 0  # a few errors, the matching unchanged
    z = rng.normal(size=(90, 2)) + 5 * labels[:, None]
    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return original(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep)
        cluster_figs.plot_cluster_scatter(z, permuted, labels, tmp_path / "scatter.png")
    by_cluster, by_label = captured["fig"].axes[:2]
    cluster_colour = {c.get_label(): tuple(c.get_facecolor()[0]) for c in by_cluster.collections}
    label_colour = {c.get_label(): tuple(c.get_facecolor()[0]) for c in by_label.collections}
    assert set(cluster_colour) == {"2 -> 0", "0 -> 1", "1 -> 2"}
    for name, colour in cluster_colour.items():
        assert colour == label_colour[name.split(" -> ")[1]]
    assert len(set(cluster_colour.values())) == 3


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_thin_clusters_no_longer_start_with_a_huge_kl(digits, covariance):
    # codes on a 2-d plane of a 6-d latent (a briefly pretrained autoencoder's codes are as degenerate): EM fits
    # near-singular components, and q(z|x) at its random width of about 1 meets them with a KL of thousands of nats
    def model(q_init):
        torch.manual_seed(0)
        vade = get_model_class("vade")(VaDEConfig(input_dim=64, latent_dim=6, hidden=(16,), n_clusters=5,
                                                  gmm_covariance=covariance, q_init=q_init))
        with torch.no_grad():
            vade.encoder.loc.weight[2:].zero_()
            vade.encoder.loc.bias[2:].zero_()
        torch.manual_seed(1)
        vade.prepare(digits.train, StepContext())
        return vade

    batch = digits.val.batch(torch.arange(100))
    kl = {}
    for q_init in ("network", "prior"):
        vade = model(q_init)
        torch.manual_seed(2)
        kl[q_init] = float(vade.loss(batch, StepContext()).metrics["kl"].mean())
    assert kl["network"] > 1000  # the failure: the first epochs then push every code into one cluster
    assert kl["prior"] < 100 and kl["prior"] < kl["network"] / 50


def test_collapsed_clusters_are_warned_about(digits):
    vade = small_model(input_dim=64, latent_dim=3, n_clusters=4)
    with torch.no_grad():  # one component takes every code
        vade.mixture.logits.copy_(torch.tensor([10.0, -10.0, -10.0, -10.0]))
    warnings = vade.training_warnings(digits.val)
    assert len(warnings) == 1 and "1 of 4 clusters" in warnings[0] and "gmm_selection=information" in warnings[0]
    assert small_model(input_dim=64, latent_dim=3, n_clusters=4).training_warnings(None) == []



@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_the_optimal_cluster_posterior_gives_a_bound_at_least_as_tight_draw_by_draw(covariance):
    from elbolab.models.vade import component_kls, optimal_cluster_kl

    model = small_model(gmm_covariance=covariance)
    x = torch.rand(16, SMALL["input_dim"], generator=torch.Generator().manual_seed(4))
    q, prior = model.encode(x), model.prior()
    kl_zc = component_kls(q, prior)  # [B, K]
    optimal = optimal_cluster_kl(kl_zc, prior)  # [B]
    for _ in range(5):  # any q(c|x), the sampled gamma of eq. 16 here, gives a KL at least as large
        z = q.sample((1,))  # [1, B, d]
        kl_z, kl_c = vade_kl(q, prior, cluster_log_posterior(prior, z))
        assert ((kl_z + kl_c)[0] >= optimal - 1e-5).all()
    # and the optimum is attained by q*(c|x) = softmax(log pi - KL_zc), by the same eq. 17 terms
    log_star = (prior.mixture_distribution.logits.log_softmax(-1) - kl_zc).log_softmax(-1)
    kl_z, kl_c = vade_kl(q, prior, log_star)
    torch.testing.assert_close(kl_z + kl_c, optimal, rtol=1e-5, atol=1e-5)
    out = get_model_class("vade")(VaDEConfig(**{**SMALL, "cluster_posterior": "optimal"})).loss(Batch(x),
                                                                                                 StepContext())
    assert (out.metrics["elbo_optimal_c"] >= out.metrics["elbo_sampled_c"] - 1e-5).all()
    torch.testing.assert_close(out.metrics["elbo"], out.metrics["elbo_optimal_c"])
