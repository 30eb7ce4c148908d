"""beta-TCVAE (Chen, Li, Grosse & Duvenaud 2018, "Isolating Sources of Disentanglement in Variational Autoencoders"):
the VAE whose KL term is split into index-code mutual information, total correlation and dimension-wise KL
(``elbolab.kl_anatomy``), each with its own weight.

Objective, per batch of M examples from a training set of N (Chen et al. s. 3-4):

    L = 1/M sum_i [ E_q(z|x_i) log p(x_i|z) - alpha I_i - beta TC_i - gamma DW_i ],    z_i ~ q(z|x_i) (reparameterised)

    I_i  = log q(z_i|x_i) - log q^(z_i)                       -> I_q(n; z)
    TC_i = log q^(z_i) - sum_j log q^(z_ij)                   -> TC(q(z)) = KL(q(z) || prod_j q(z_j))
    DW_i = sum_j log q^(z_ij) - log p(z_ij)                   -> sum_j KL(q(z_j) || p(z_j))

with q^ the minibatch-weighted sampling estimate of the aggregate posterior q(z) = 1/N sum_n q(z|x_n) from the
batch's own posteriors (Chen et al. s. 4.1; ``kl_anatomy.minibatch_weighted_sampling``):

    q^(z_i) = 1/N q(z_i|x_i) + (N - 1)/(N (M - 1)) sum_{k != i} q(z_i|x_k)     (mws_weights=normalised, default)
    q^(z_i) = 1/(N M) sum_k q(z_i|x_k)                                         (mws_weights=paper)

and the same per dimension for q^(z_ij). The three terms sum to log q(z_i|x_i) - log p(z_i), a one-sample estimate
of KL(q(z|x_i) || p(z)), whatever q^ is: alpha = beta = gamma = 1 is the VAE (up to Monte-Carlo noise). The paper's
beta-TCVAE keeps alpha = gamma = 1 and raises beta alone. The normalised weights sum to one (an unbiased estimate of
q(z), exact at M = N), so the ``mi``, ``tc`` and ``dwkl`` metrics estimate the decomposition (log q^ is biased low
for finite M: I high, by O(1/M)); the paper's weights (and its authors' code's) sum to 1/N, which shifts log q^ by
between -log N and -log M, little of it felt by the gradients, much by the metrics (I can then exceed its bound
log N). With L > 1 Monte-Carlo samples every draw is scored against the batch's posteriors and the terms are
averaged over the draws.

N is the training set's size (``n_train``, filled from the data by ``from_data``). The reported ``elbo`` metric is
the plain ELBO, E_q log p(x|z) - KL(q(z|x) || p(z)) with the KL in closed form, comparable with every other model;
``mi``, ``tc`` and ``dwkl`` are per-batch means. The encoder must be diagonal (q(z|x) = prod_j q(z_j|x)), the prior
is N(0, I); evaluation (importance-sampled log p(x)) is the vae's. beta is the run's ``beta`` schedule, as
for every model (``--beta 6``, ``--kl-warmup E`` to raise it from 0, ``--schedule beta=...``); alpha and gamma are
options. The authors' README trains with ``-beta 6 --tcvae`` (the default here); their code's default is beta = 1,
and the paper's text was not checked for a recommended value.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.kl_anatomy import MWS_WEIGHTS, minibatch_weighted_sampling
from elbolab.models.base import LossOutput, ModelConfig, check_options, option
from elbolab.models.registry import register_model
from elbolab.models.vae import VAE
from elbolab.objectives import kl_term
from elbolab.schedules import StepContext

DEFAULT_BETA = 6.0  # the authors' example (README: -beta 6 --tcvae)


@dataclass(frozen=True)
class BetaTCVAEConfig(ModelConfig):
    alpha: float = option(1.0, "weight of the index-code mutual information I(n; z) (paper: 1)")
    gamma: float = option(1.0, "weight of the dimension-wise KL sum_j KL(q(z_j) || p(z_j)) (paper: 1)")
    mws_weights: str = option("normalised", "minibatch estimate of q(z): normalised (1/N own, (N-1)/(N(M-1)) "
                                            "others: unbiased q) | paper (1/(NM) each, as Chen et al.)")
    n_train: int = option(1, "training rows N (from the data); 1 leaves the own posterior alone: the plain KL")

    data_fields: typing.ClassVar[tuple[str, ...]] = (*ModelConfig.data_fields, "n_train")

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.alpha >= 0, "alpha >= 0", self.alpha),
            (self.gamma >= 0, "gamma >= 0", self.gamma),
            (self.mws_weights in MWS_WEIGHTS, f"mws_weights in {list(MWS_WEIGHTS)}", self.mws_weights),
            (self.n_train >= 1, "n_train >= 1 training rows", self.n_train),
            (self.encoder_covariance == "diag", "encoder_covariance diag (the decomposition needs q(z|x) = "
                                                "prod_j q(z_j|x)); use --encoder-covariance diag",
             self.encoder_covariance),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"beta-tcvae: expected {expected}, got {got!r}")

    @classmethod
    def from_data(cls, data, **options) -> BetaTCVAEConfig:
        check_options(cls, options, exclude=cls.data_fields)
        return cls(input_dim=data.dim, image_shape=data.image_shape, n_train=len(data), **options)


@register_model("beta-tcvae")
class BetaTCVAE(VAE):
    """VAE with alpha I(n; z) + beta TC + gamma dimension-wise KL in place of the KL (minibatch-weighted sampling)."""

    config_class = BetaTCVAEConfig
    # beta, the weight of the total correlation, is the run's beta schedule (--beta, --kl-warmup, --schedule beta=),
    # default 6; alpha and gamma are config options (--set alpha=1)
    scheduled_values = ("beta",)

    def scheduled_defaults(self) -> dict[str, float]:
        return {"beta": DEFAULT_BETA}

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        q = self.encode(batch)  # Independent Normal, batch [M], event [d]
        z = q.rsample((ctx.mc_samples,))  # [L, M, d]
        recon = self.decode(z, batch).log_prob(batch.x).mean(0)  # [M]
        prior = self.prior(batch)
        kl = kl_term(q, prior, z)  # [M], closed form: for the elbo metric only
        terms = minibatch_weighted_sampling(z, q.base_dist.loc, q.base_dist.scale, self.config.n_train, prior,
                                            weights=self.config.mws_weights)  # [L, M] each
        mi, tc, dwkl = (t.mean(0) for t in (terms.mutual_information, terms.total_correlation,
                                            terms.dimension_wise_kl))  # [M]
        c = self.config
        penalty = c.alpha * mi + ctx.value("beta", DEFAULT_BETA) * tc + c.gamma * dwkl  # [M]
        loss = -(recon - penalty).mean()
        metrics = {"elbo": (recon - kl).detach(), "kl": kl.detach(), "recon": recon.detach(),
                   "mi": mi.mean().detach(), "tc": tc.mean().detach(), "dwkl": dwkl.mean().detach()}
        return LossOutput(self.route_loss(loss, ctx), metrics)
