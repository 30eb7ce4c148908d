"""Variational Deep Embedding (Jiang, Zheng, Tan, Tang & Zhou 2017, "Variational Deep Embedding: an unsupervised and
generative approach to clustering"; notes 004, the VAE with a structured prior).

Generative process: c ~ Cat(pi), z ~ N(mu_c, diag sigma_c^2), x ~ p(x|z) (Bernoulli or any likelihood head);
``gmm_covariance=full`` (ours, not the paper's) gives the components full covariances, z ~ N(mu_c, Sigma_c).
Mean-field posterior q(z, c|x) = q(z|x) q(c|x), q(z|x) = N(mu~(x), diag sigma~^2(x)) and q(c|x) = gamma, the
responsibilities of the GMM prior at a sample z ~ q(z|x): gamma_c = p(c|z) (Jiang et al. eq. 16). The ELBO
(Jiang et al. eq. 17, the Gaussian expectations in closed form) is, per example,

    L(x) = 1/L sum_l log p(x|z_l) - 1/L sum_l [ sum_c gamma_lc KL(q(z|x) || N(mu_c, sigma_c^2))
                                                 + KL(Cat(gamma_l) || Cat(pi)) ],     gamma_lc = p(c | z_l)

(eq. 17 written out term by term is the same expression: the log 2 pi terms cancel). For any q(c|x) not depending
on z it lower-bounds the ELBO with the marginal mixture prior, E_q[log p(x|z) + log p(z) - log q(z|x)], by exactly
E_q(z|x) KL(q(c|x) || p(c|z)) >= 0. The prior is ``elbolab.networks.MixturePrior`` (a MixtureSameFamily), fitted
before training by EM on the encoder means (``prepare``, ``elbolab.classical.GaussianMixture``, with the prior's
covariances; of several restarts the likeliest, or with ``gmm_selection=information`` the most informative),
usually after ``init_from`` a pretrained ``autoencoder`` run (``load_pretrained`` maps its encoder body and code
layer onto the encoder body and mean head). A cluster is argmax_c q(c|x) at z = mu~(x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import Categorical, Independent, MultivariateNormal, Normal, kl_divergence

from elbolab.classical import GaussianMixture
from elbolab.classical.information import mutual_information
from elbolab.clustering import clustering_scores
from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.figures.clusters import cluster_figures, save_latent_snapshot
from elbolab.figures.standard import standard_figures
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig, option
from elbolab.models.registry import register_model
from elbolab.networks import MixturePrior
from elbolab.schedules import StepContext

CHUNK = 1000  # examples per forward pass when predicting or fitting the GMM over a whole split
# the EM fit's covariance floor, relative to the codes' mean variance: thin clusters of a briefly pretrained
# autoencoder's codes otherwise give variances near 1e-6 and a prior no q(z|x) of ordinary width can meet
COVARIANCE_FLOOR = 1e-3


@dataclass(frozen=True)
class VaDEConfig(ModelConfig):
    latent_dim: int = option(10, "dimensions of z (the paper: 10)")
    hidden: tuple[int, ...] = option((500, 500, 2000), "encoder hidden sizes; decoder mirrored (paper: 500,500,2000)")
    n_clusters: int = option(10, "mixture components c of the prior (clusters)")
    gmm_init: bool = option(True, "fit the prior by EM on the encoder means before the first epoch")
    gmm_n_init: int = option(1, "EM restarts of that fit")
    gmm_selection: str = option("likelihood", "which restart initialises the prior: likelihood (the highest, as "
                                "EM's n_init) or information (the highest I(z; c) of the codes and their clusters)")
    gmm_max_iter: int = option(200, "EM iterations per restart")
    gmm_covariance: str = option("diag", "covariances of the prior's components and of their EM fit: diag (the "
                                 "paper) or full (multivariate normal components)")
    cluster_posterior: str = option("sampled", "q(c|x) in the trained ELBO: sampled (the paper: p(c|z) at z ~ "
                                    "q(z|x)) or optimal (pi_c exp(-KL(q(z|x) || p(z|c))) normalised: a tighter bound "
                                    "at no extra cost); both bounds are logged")
    q_init: str = option("prior", "initial width of q(z|x) after the prior's fit: prior (as narrow as the "
                         "narrowest component, so the first KL is of a sane size) or network (the log-variance "
                         "layer's random start, as the paper)")

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.n_clusters >= 2, "n_clusters >= 2 (one cluster is a plain VAE with a Gaussian prior)",
             self.n_clusters),
            (self.encoder_covariance == "diag", "encoder_covariance diag (eq. 17 is for a diagonal q(z|x))",
             self.encoder_covariance),
            (self.gmm_n_init >= 1, "gmm_n_init >= 1", self.gmm_n_init),
            (self.gmm_max_iter >= 1, "gmm_max_iter >= 1", self.gmm_max_iter),
            (self.gmm_selection in ("likelihood", "information"), "gmm_selection likelihood or information",
             self.gmm_selection),
            (self.gmm_covariance in ("diag", "full"), "gmm_covariance diag or full", self.gmm_covariance),
            (self.q_init in ("prior", "network"), "q_init prior or network", self.q_init),
            (self.cluster_posterior in ("sampled", "optimal"), "cluster_posterior sampled or optimal",
             self.cluster_posterior),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"vade: expected {expected}, got {got!r}")


def cluster_log_posterior(prior, z: torch.Tensor) -> torch.Tensor:
    """log p(c|z) of a MixtureSameFamily prior for z ``[..., d]``: ``[..., K]`` (gamma of eq. 16, in log space)."""
    log_joint = prior.component_distribution.log_prob(z.unsqueeze(-2)) + prior.mixture_distribution.logits
    return log_joint.log_softmax(-1)  # [..., K]


def component_kls(q: Independent, prior) -> torch.Tensor:
    """KL(q(z|x) || p(z|c)) for every example and component, ``[B, K]``. ``q`` is diagonal with batch [B]; ``prior``
    a MixtureSameFamily of diagonal (Independent Normal) or full (MultivariateNormal) components."""
    loc, scale = q.base_dist.loc.unsqueeze(-2), q.base_dist.scale.unsqueeze(-2)  # [B, 1, d]
    if isinstance(prior.component_distribution, MultivariateNormal):  # torch's KL needs the same family
        q_by_c = MultivariateNormal(loc, scale_tril=torch.diag_embed(scale), validate_args=False)  # batch [B, 1]
    else:
        q_by_c = Independent(Normal(loc, scale, validate_args=False), 1)  # batch [B, 1]
    return kl_divergence(q_by_c, prior.component_distribution)  # [B, K]


def optimal_cluster_kl(kl_zc: torch.Tensor, prior) -> torch.Tensor:
    """The KL part of the ELBO with the optimal q(c|x) for a given q(z|x): q*(c|x) proportional to
    pi_c exp(-KL(q(z|x) || p(z|c))), and then sum_c q*_c KL_zc + KL(q* || pi) = -logsumexp_c(log pi_c - KL_zc),
    ``[B]``. Any other q(c|x), the sampled gamma of eq. 16 included, gives a KL at least this large."""
    return -torch.logsumexp(prior.mixture_distribution.logits.log_softmax(-1) - kl_zc, dim=-1)


def vade_kl(q: Independent, prior, log_gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two KL terms of eq. 17 for q(c|x) = exp(log_gamma) ``[..., B, K]``: (sum_c gamma_c KL(q(z|x) || p(z|c)),
    KL(q(c|x) || p(c))), each ``[..., B]``. ``q`` is diagonal with batch [B]; ``prior`` a MixtureSameFamily of
    diagonal (Independent Normal) or full (MultivariateNormal) components."""
    kl_zc = component_kls(q, prior)  # [B, K]
    kl_z = (log_gamma.exp() * kl_zc).sum(-1)  # [..., B]
    kl_c = kl_divergence(Categorical(logits=log_gamma, validate_args=False), prior.mixture_distribution)  # [..., B]
    return kl_z, kl_c


def fit_gmm(codes, n_clusters: int, *, covariance: str, n_init: int, selection: str, seed: int,
            progress: bool = False, **options):
    """EM (``elbolab.classical.GaussianMixture``) on codes [N, d] with ``n_init`` restarts, keeping the likeliest
    (``selection="likelihood"``) or the one with the highest I(z; c) (``"information"``; see ``VaDE.prepare``)."""
    import numpy as np

    def em(restarts: int, random_state):
        return GaussianMixture(n_clusters, covariance_type=covariance, n_init=restarts, random_state=random_state,
                               progress=progress, **options).fit(codes)

    if selection == "likelihood":
        return em(n_init, seed)
    rng = np.random.RandomState(seed)  # one stream for all restarts, as EM's own n_init
    return max((em(1, rng) for _ in range(n_init)), key=lambda fit: mutual_information(fit.predict_proba(codes)))


@register_model("vade")
class VaDE(LatentVariableModel):
    """VAE with a learnable Gaussian-mixture prior, trained on the VaDE ELBO; clusters are argmax q(c|x)."""

    config_class = VaDEConfig

    def __init__(self, config: VaDEConfig):
        super().__init__(config)
        self.mixture = MixturePrior(config.n_clusters, config.latent_dim, covariance=config.gmm_covariance)

    def prior(self, batch: Batch | None = None):
        return self.mixture()  # MixtureSameFamily, batch [], event [d]

    def cluster_log_probs(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """log q(c|x) = log p(c | z = mu~(x)), ``[B, K]``."""
        return cluster_log_posterior(self.prior(), self.encode(batch).mean)

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        q = self.encode(batch)  # batch [B], event [d]
        z = q.rsample((ctx.mc_samples,))  # [L, B, d]
        recon = self.decode(z, batch).log_prob(batch.x).mean(0)  # [B]
        prior = self.prior(batch)
        kl_z, kl_c = vade_kl(q, prior, cluster_log_posterior(prior, z))  # [L, B] each; gamma at each z_l
        kl_sampled = (kl_z + kl_c).mean(0)  # [B]
        kl_optimal = optimal_cluster_kl(component_kls(q, prior), prior)  # [B], q*(c|x) in closed form
        kl = kl_optimal if self.config.cluster_posterior == "optimal" else kl_sampled
        elbo = recon - kl
        metrics = {"elbo": elbo.detach(), "recon": recon.detach(), "kl": kl.detach(),
                   "kl_z": kl_z.mean(0).detach(), "kl_c": kl_c.mean(0).detach(),
                   "elbo_sampled_c": (recon - kl_sampled).detach(), "elbo_optimal_c": (recon - kl_optimal).detach()}
        return LossOutput({"model": -elbo.mean()}, metrics)

    # ----- the whole split at once (no gradients) -----
    @torch.no_grad()
    def _over_split(self, data, fn) -> torch.Tensor:
        """fn(batch) for a Batch, a tensor [N, D] or a data split (binarised once with seed 0), in chunks, cat'd."""
        was_training = self.training
        self.eval()
        try:
            like = next(self.parameters())
            if hasattr(data, "batch") and not isinstance(data, Batch):
                generator = torch.Generator().manual_seed(0)
                parts = [fn(data.batch(idx, generator).to(like)) for idx in torch.arange(len(data)).split(CHUNK)]
            else:
                batch = as_batch(data)
                parts = [fn(batch[i:i + CHUNK].to(like)) for i in range(0, len(batch), CHUNK)]
        finally:
            self.train(was_training)
        return torch.cat(parts).cpu()

    def encoder_means(self, data) -> torch.Tensor:
        """mu~(x) for every example, ``[N, d]``."""
        return self._over_split(data, lambda b: self.encode(b).mean)

    def predict(self, data) -> torch.Tensor:
        """The cluster of every example, argmax_c q(c|x), ``[N]`` int64."""
        return self._over_split(data, lambda b: self.cluster_log_probs(b).argmax(-1))

    def prepare(self, train, ctx: StepContext) -> None:
        """Fit the prior by EM on the encoder means of the training split, with the prior's covariances. The EM
        seed is drawn from torch's generator (seeded by the trainer): deterministic, and different per
        training seed. Of ``gmm_n_init`` restarts, ``gmm_selection=information`` keeps the one whose clusters carry
        the most information about the codes, I(z; c) = H(mean q(c|z)) - mean H(q(c|z)) (confident and balanced;
        Krause, Perona & Gomes 2010), not the highest likelihood: on MNIST codes the likeliest fit often merges
        two digits and splits another (BENCHMARKS.md)."""
        if not self.config.gmm_init:
            return
        means = self.encoder_means(train).double().numpy()  # [N, d]
        if len(means) < self.config.n_clusters:
            raise ElbolabError(f"vade: expected at least n_clusters={self.config.n_clusters} training examples to "
                               f"initialise the prior, got {len(means)}; use more data or fewer clusters")
        seed = int(torch.randint(2**31 - 1, ()))
        c = self.config
        floor = max(COVARIANCE_FLOOR * float(means.var(0).mean()), 1e-6)
        print(f"vade: fitting the {c.n_clusters}-component prior by EM on {len(means):,} codes "
              f"({c.gmm_n_init} restart{'s' if c.gmm_n_init > 1 else ''}, {c.gmm_covariance} covariances)",
              flush=True)  # seconds to a minute: said before it starts
        gmm = fit_gmm(means, c.n_clusters, covariance=c.gmm_covariance, n_init=c.gmm_n_init,
                      selection=c.gmm_selection, seed=seed, max_iter=c.gmm_max_iter, reg_covar=floor, progress=True)
        self.set_prior(gmm.weights_, gmm.means_, gmm.covariances_)
        if c.q_init == "prior":
            self.start_q_at_the_prior_width()

    @torch.no_grad()
    def start_q_at_the_prior_width(self) -> None:
        """q(z|x)'s log-variance layer starts constant at the narrowest component's variance (its smallest
        eigenvalue for a full prior). From a random start q's variances are about 1: against components of
        variance 1e-4 every KL(q(z|x) || p(z|c)) is then about d / (2 1e-4) nats, and the first epochs drive every
        code into one cluster (seen with a short pretraining: a first KL of 1.6e5 nats, 11.8% accuracy)."""
        components = self.prior().component_distribution
        if isinstance(components, MultivariateNormal):
            narrowest = float(torch.linalg.eigvalsh(components.covariance_matrix.double()).min())  # [K, d, d]
        else:
            narrowest = float(components.variance.min())  # [K, d]
        head = self.encoder.log_var
        head.weight.zero_()
        head.bias.fill_(math.log(narrowest))

    def set_prior(self, weights, means, covariances) -> None:
        """Set pi [K], mu_c [K, d] and the covariances of the mixture prior: variances [K, d], or (full prior)
        matrices [K, d, d]."""
        self.mixture.set(weights, means, covariances)

    def load_pretrained(self, weights: dict[str, torch.Tensor], partial: bool = False) -> list[str]:
        """As the base class, and an ``autoencoder`` run's encoder (``encoder.0`` body, ``encoder.1`` code layer)
        goes to the encoder body and the mean head; the log-variance head keeps its initial weights."""
        renamed = {}
        for key, value in weights.items():
            for old, new in (("encoder.0.", "encoder.body."), ("encoder.1.", "encoder.loc.")):
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            renamed[key] = value
        return super().load_pretrained(renamed, partial=partial)

    @torch.no_grad()
    def sample_per_cluster(self, n: int) -> torch.Tensor:
        """E[x|z] for n draws z ~ N(mu_c, sigma_c^2) of every cluster c, ``[K, n, D]``."""
        z = self.prior().component_distribution.sample((n,))  # [n, K, d]
        return self.decode_mean(z.transpose(0, 1))  # [K, n, D]

    def training_warnings(self, val) -> list[str]:
        """A warning when the clusters have collapsed: fewer than half of them used, or one holding most points."""
        if val is None or not len(val):
            return []
        sizes = torch.bincount(self.predict(val.head(min(len(val), 5000))), minlength=self.config.n_clusters)
        used, largest = int((sizes > 0).sum()), float(sizes.max() / sizes.sum())
        if used * 2 > self.config.n_clusters and largest < 0.5:
            return []
        return [f"cluster collapse: {used} of {self.config.n_clusters} clusters are used and the largest holds "
                f"{largest:.0%} of the validation codes. Try a longer pretraining of the autoencoder (--epochs 50 on "
                "MNIST), --set gmm_n_init=10 --set gmm_selection=information, or a lower --lr"]

    def eval_metrics(self, data, per_example_log_px: torch.Tensor) -> dict:
        """Cluster sizes, and with class labels: accuracy (Hungarian matching), NMI and ARI on this split."""
        clusters = self.predict(data)
        metrics = {"cluster_sizes": torch.bincount(clusters, minlength=self.config.n_clusters).tolist()}
        labels = getattr(data, "y", None)
        if labels is not None and labels.dim() == 1:
            metrics.update(clustering_scores(labels, clusters))
        return metrics

    def epoch_end(self, epoch: int, run_dir, val) -> None:
        """For the proposed per-epoch trainer hook: a snapshot of the validation codes (no randomness used)."""
        if val is not None and len(val):
            save_latent_snapshot(self, val, run_dir, epoch)

    def figures(self, run_dir, splits) -> list:
        return standard_figures(self, run_dir, splits, scatter=False) + cluster_figures(self, run_dir, splits)
