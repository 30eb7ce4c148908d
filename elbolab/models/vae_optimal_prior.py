"""VAE with an implicit optimal prior (Takahashi, Iwata, Yamanaka, Yamada & Yagi 2019, "Variational Autoencoder with
Implicit Optimal Priors"; notes 004, the optimal-prior section).

The prior that maximises the ELBO summed over the data is the aggregated posterior q(z) = E_pdata q(z|x). Its KL
has no closed form, but splits into a closed form and a log density ratio in the low-dimensional z (notes 004):

    KL(q(z|x) || q(z)) = KL(q(z|x) || p(z)) - E_q(z|x)[log q(z)/p(z)],     p(z) = N(0, I),
    L(x) ~= E_q(z|x)[log p(x|z) + T(z)] - KL(q(z|x) || p(z)),               T(z) ~ log q(z)/p(z)

T is the logit of a discriminator (``elbolab.density_ratio``) trained, in its own parameter group, to tell encoder
samples z ~ q(z|x) on the data (q(z), label 1) from prior draws z ~ N(0, I) (label 0); each step updates both
groups (the encoder/decoder on L, the discriminator on its cross-entropy). Gradient: T(z) enters L through the
reparameterised z only. The dependence of q(z) itself on the encoder weights phi is dropped without bias over the
data, since E_pdata E_q(z|x)[grad_phi log q_phi(z)] = E_q(z)[grad_phi log q_phi(z)] = grad_phi int q_phi(z) dz = 0.

Evaluation. The implicit prior p(z) exp(T(z)) is not normalised, so the importance-sampled log p(x) uses an
approximate density: ``log_px_is_exact_estimate = False``. The exact alternative (``eval_metrics``, key
``log_px_mixture_prior``): the aggregated posterior of N = ``mixture_size`` (default 1000) training points chosen
before training, q_N(z) = 1/N sum_n q(z|x_n), a MixtureSameFamily; its importance-sampled log p(x) (K =
``mixture_eval_k``) is an estimate of the same kind as the vae's (a stochastic lower bound tending to log p(x) as K
grows) for the generative model with that normalised mixture prior. ``sample`` draws z from this mixture too. The
metrics: elbo (L above, approximate), elbo_normal_prior (the exact ELBO with p(z) = N(0, I)), kl (the estimated
KL(q(z|x) || q(z))), kl_normal_prior, log_ratio (E_q(z|x)[T]) and discriminator_accuracy; ``kl_terms`` (active
units, the collapse check) are per-dimension KLs to N(0, I).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributions import Categorical, MixtureSameFamily

from elbolab.data.core import Batch, as_batch
from elbolab.density_ratio import DensityRatioEstimator, ratio_accuracy, ratio_loss, split_parameter_groups
from elbolab.errors import ElbolabError
from elbolab.estimators import importance_sampled_log_px
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig, option
from elbolab.models.registry import register_model
from elbolab.objectives import kl_term
from elbolab.schedules import StepContext

ROWS_BYTES = 8 * 2**20  # size of the [rows, N, d] float32 temporaries of one mixture log_prob call


@dataclass(frozen=True)
class OptimalPriorConfig(ModelConfig):
    discriminator_width: int = option(256, "hidden units per layer of the density-ratio network T(z)")
    discriminator_depth: int = option(3, "hidden layers of T(z) (leaky ReLU 0.2)")
    mixture_size: int = option(1000, "N training points whose q(z|x_n) form the mixture prior (eval, samples)")
    mixture_eval_k: int = option(1000, "importance samples per example for log p(x) under that mixture prior")

    def __post_init__(self):
        super().__post_init__()
        for name in ("discriminator_width", "discriminator_depth", "mixture_size", "mixture_eval_k"):
            if getattr(self, name) < 1:
                raise ElbolabError(f"vae-optimal-prior: expected {name} >= 1, got {getattr(self, name)!r}")


@register_model("vae-optimal-prior")
class OptimalPriorVAE(LatentVariableModel):
    """VAE whose prior is the aggregated posterior, through a learned log density ratio log q(z)/N(z; 0, I)."""

    config_class = OptimalPriorConfig
    log_px_is_exact_estimate = False  # the implicit prior p(z) exp T(z) is not normalised

    def __init__(self, config: OptimalPriorConfig):
        super().__init__(config)
        self.log_ratio = DensityRatioEstimator(config.latent_dim, config.discriminator_width,
                                               config.discriminator_depth)
        self.register_buffer("mixture_x", torch.zeros(config.mixture_size, config.input_dim))  # [N, D]
        self.register_buffer("mixture_count", torch.zeros((), dtype=torch.int64))  # rows of mixture_x in use
        self._exact_mixture: MixtureSameFamily | None = None  # set inside mixture_prior(): weights use q_N(z)

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        q = self.encode(batch)  # batch [B], event [d]
        z = q.rsample((ctx.mc_samples,))  # [L, B, d]
        recon = self.decode(z, batch).log_prob(batch.x).mean(0)  # [B]
        prior = self.prior(batch)
        kl_normal = kl_term(q, prior, z)  # [B]
        log_ratio = self.log_ratio(z).mean(0)  # [B]: E_q(z|x)[T(z)] ~ E_q(z|x)[log q(z)/p(z)]
        kl = kl_normal - log_ratio  # [B] ~ KL(q(z|x) || q(z))
        elbo = recon - kl

        aggregated = z[0].detach()  # [B, d] draws of q(z)
        logits = self.log_ratio(torch.cat([aggregated, prior.sample((len(aggregated),))]))  # [2B]
        logit_q, logit_p = logits.split(len(aggregated))
        metrics = {"elbo": elbo.detach(), "recon": recon.detach(), "kl": kl.detach(),
                   "elbo_normal_prior": (recon - kl_normal).detach(), "kl_normal_prior": kl_normal.detach(),
                   "log_ratio": log_ratio.detach(), "discriminator_accuracy": ratio_accuracy(logit_q, logit_p)}
        return LossOutput({"model": -elbo.mean(), "discriminator": ratio_loss(logit_q, logit_p)}, metrics)

    def parameter_groups(self) -> dict[str, list]:
        return split_parameter_groups(self, self.log_ratio)

    # ----- the N-component aggregated-posterior mixture -----
    def prepare(self, train, ctx: StepContext) -> None:
        """Choose the N training points of the mixture prior (torch's generator, seeded by the trainer)."""
        n = min(self.config.mixture_size, len(train))
        index = torch.randperm(len(train))[:n]
        x = train.batch(index, torch.Generator().manual_seed(0)).x  # one fixed binarisation, if any
        with torch.no_grad():
            self.mixture_x[:n] = x.to(self.mixture_x)
            self.mixture_count.fill_(n)

    def mixture(self) -> MixtureSameFamily:
        """q_N(z) = 1/N sum_n q(z|x_n) over the stored training points; batch [], event [d]."""
        n = int(self.mixture_count)
        if n == 0:
            raise ElbolabError("vae-optimal-prior: no mixture points yet; they are chosen when training starts "
                               "(prepare(train, ctx)); train the model or load a trained run")
        components = self.encode(self.mixture_x[:n])  # batch [N], event [d]
        return MixtureSameFamily(Categorical(logits=self.mixture_x.new_zeros(n), validate_args=False), components,
                                 validate_args=False)

    def mixture_log_prob(self, z: torch.Tensor, mixture: MixtureSameFamily | None = None) -> torch.Tensor:
        """log q_N(z) for z ``[..., d]``, ``[...]``, in row chunks that keep the [rows, N, d] temporaries small."""
        mixture = self.mixture() if mixture is None else mixture
        n, d = mixture.mixture_distribution.logits.shape[-1], z.shape[-1]
        rows = z.reshape(-1, d)
        step = max(1, ROWS_BYTES // (4 * n * d))
        return torch.cat([mixture.log_prob(part) for part in rows.split(step)]).reshape(z.shape[:-1])

    @contextlib.contextmanager
    def mixture_prior(self):
        """Within this block ``importance_samples`` weighs with the normalised mixture prior q_N(z) (its components
        are encoded once, on entry, without gradients)."""
        with torch.no_grad():
            self._exact_mixture = self.mixture()
        try:
            yield self
        finally:
            self._exact_mixture = None

    def importance_samples(self, batch: Batch | torch.Tensor, k: int, *, reparameterize: bool = False,
                           stop_q_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """As the base class, with log p(z) replaced by log p(z) + T(z) (the implicit prior), or by log q_N(z)
        inside ``mixture_prior()``: ``([k, B, d], [k, B])``."""
        batch = as_batch(batch)
        z, log_w = super().importance_samples(batch, k, reparameterize=reparameterize, stop_q_grad=stop_q_grad)
        if self._exact_mixture is not None:
            return z, log_w - self.prior(batch).log_prob(z) + self.mixture_log_prob(z, self._exact_mixture)
        return z, log_w + self.log_ratio(z)

    def eval_metrics(self, data, per_example_log_px: torch.Tensor) -> dict:
        """log p(x) under the mixture prior q_N (exact model density, importance-sampled), seed 0."""
        if int(self.mixture_count) == 0:
            return {}
        if hasattr(data, "batch") and not isinstance(data, Batch):
            data = data.batch(torch.arange(len(data)), torch.Generator().manual_seed(0))
        with torch.random.fork_rng(devices=[]), self.mixture_prior():
            torch.manual_seed(0)
            estimate = importance_sampled_log_px(self, data, k=self.config.mixture_eval_k)
        result = {**estimate.to_dict(), "n_components": int(self.mixture_count), "is_exact_estimate": True,
                  "note": f"importance-sampled log p(x) of the model whose prior is the mixture of q(z|x_n) over "
                          f"{int(self.mixture_count)} training points: a normalised prior, so an estimate of the "
                          "same kind as the vae's log p(x) (not of the implicit-prior log_px above)"}
        return {"log_px_mixture_prior": result}

    @torch.no_grad()
    def sample(self, n: int, batch: Batch | None = None) -> torch.Tensor:
        """Means of p(x|z) for n draws z ~ q_N(z), the aggregated-posterior mixture, ``[n, D]``."""
        return self.decode_mean(self.mixture().sample((n,)), batch)
