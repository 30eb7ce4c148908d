"""Hierarchical VAE with a bottom-up q (the IWAE paper's two-stochastic-layer model, Burda, Grosse & Salakhutdinov
2016 s5; notes 004 "Hierarchical VAE", the version with the "potential problem").

Generative model, L Gaussian layers, z = (z_1, ..., z_L) bottom first (notes 004; shared with ``ladder-vae``):

    p(x, z) = p(x | z_1) prod_{l=1}^{L-1} p(z_l | z_{l+1}) p(z_L),   p(z_L) = N(0, I),
    p(z_l | z_{l+1}) = N(mu_p,l(z_{l+1}), diag var_p,l(z_{l+1})),   var = softplus(Linear(MLP(.)))

Inference, bottom-up:  q(z|x) = q(z_1 | x) prod_{l=2}^{L} q(z_l | z_{l-1}),  each a diagonal Gaussian of an MLP.

Objective, per example:  ELBO(x) = E_q[log p(x|z_1)] - sum_l KL_l  (notes 004 write "+ KL"; the KLs are subtracted)
with KL_L = KL(q(z_L|z_{L-1}) || p(z_L)) in closed form (torch ``kl_divergence``, given the sampled parent) and,
for l < L, the single-sample KL_l = log q(z_l|z_{l-1}) - log p(z_l|z_{l+1}): under a bottom-up q, z_{l+1} is drawn
after z_l, so q(z_l|.) cannot be integrated out with p's parent held fixed. The KL weight ``beta`` (scheduled:
``--kl-warmup E`` is the warm-up of Sønderby et al. 2016) multiplies sum_l KL_l; the ``elbo`` metric is beta = 1.

log p(x) by importance sampling over k joint draws z^(k) ~ q(z|x) (Burda et al. eq. 8):
    log w = log p(x|z_1) + sum_{l<L} log p(z_l|z_{l+1}) + log p(z_L) - log q(z_1, ..., z_L | x).

Config: ``latent_dims`` (bottom first; IWAE paper 100,50), ``hidden`` (one MLP width per stochastic layer, the
block under it, or one width for all; IWAE paper 200,100), ``depth`` deterministic layers per block (2; 0 gives
linear-Gaussian layers), ``batch_norm``. ``latent_dim`` is the size of the joint z, sum(latent_dims): it is derived
when left at the base default 20, and any other value must equal the sum.
Diagnostics per layer: ``latent_means`` and ``kl_terms`` ({"z1": [B, d_1], ...}; the KL terms of one joint draw), so
the evaluator counts active units per layer (Burda et al. 2016 s5.2: u active if Cov_x(E_q[z_u|x]) > 0.01).
E_q[z_l|x] = E_q[mean of q(z_l|parents)] is averaged over ``mean_samples`` joint draws (default 1000; seeded).
The mean pass (parents at their q-means, ``mean_samples=0``) is exact only for the layer drawn first and for linear
layers, and the difference is not negligible on MNIST (BENCHMARKS.md, "Active units in a hierarchy").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution, Independent, kl_divergence

from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.hierarchy import Block, GaussianHead, HierarchicalPrior, diagonal_normal
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig, option
from elbolab.models.registry import register_model
from elbolab.networks import full_precision, standard_normal_prior
from elbolab.schedules import StepContext

BASE_LATENT_DIM = next(f.default for f in dataclasses.fields(ModelConfig) if f.name == "latent_dim")  # 20


@dataclass(frozen=True)
class HierarchicalConfig(ModelConfig):
    latent_dim: int = option(20, "size of the joint z = (z1..zL): derived, sum(latent_dims); leave it out")
    hidden: tuple[int, ...] = option((200, 100), "MLP width under each stochastic layer, bottom first (or one)")
    activation: str = option("tanh", "relu | tanh | elu | softplus | gelu (IWAE paper: tanh)")
    latent_dims: tuple[int, ...] = option((100, 50), "stochastic layer sizes z1..zL, bottom first")
    depth: int = option(2, "deterministic layers per MLP block (0: linear maps between layers)")
    batch_norm: bool = option(False, "batch normalisation after each deterministic linear layer")
    mean_samples: int = option(1000, "joint draws of q averaged for E_q[z_l|x] in latent_means (active units); "
                               "0: the mean pass, exact for linear layers only")

    def __post_init__(self):
        super().__post_init__()
        name, dims = self.registry_label(), self.latent_dims
        if len(dims) < 1 or min(dims) < 1:
            raise ElbolabError(f"{name}: expected latent_dims of sizes >= 1, bottom first, got {dims!r}; "
                               "try --set latent_dims=64,32")
        if len(self.hidden) not in (1, len(dims)):
            raise ElbolabError(f"{name}: expected one hidden width per stochastic layer ({len(dims)}) or one for "
                               f"all, got {self.hidden!r}; try --hidden {','.join(['200'] * len(dims))}")
        if self.depth < 0:
            raise ElbolabError(f"{name}: expected depth >= 0 deterministic layers per block, got {self.depth}")
        if self.mean_samples < 0:
            raise ElbolabError(f"{name}: expected mean_samples >= 0 draws for E_q[z_l|x] (0: the mean pass), got "
                               f"{self.mean_samples}; try --set mean_samples=1000")
        if self.architecture != "mlp" or self.encoder_covariance != "diag":
            raise ElbolabError(f"{name}: expected --arch mlp and --encoder-covariance diag (the blocks are MLPs "
                               f"with diagonal Gaussians), got {self.architecture!r} and {self.encoder_covariance!r}")
        total = sum(dims)
        if self.latent_dim == BASE_LATENT_DIM and total != self.latent_dim:
            object.__setattr__(self, "latent_dim", total)  # the base default: derived
        elif self.latent_dim != total:
            raise ElbolabError(f"{name}: expected latent_dim = sum(latent_dims) = {total}, got {self.latent_dim}; "
                               "leave latent_dim out (it is derived) or change latent_dims")

    def registry_label(self) -> str:
        return "hvae"

    def widths(self) -> tuple[int, ...]:
        """The hidden width of the block under each stochastic layer, ``[L]``."""
        return self.hidden * len(self.latent_dims) if len(self.hidden) == 1 else self.hidden


@register_model("hvae")
class HierarchicalVAE(LatentVariableModel):
    """Hierarchical VAE, L Gaussian layers, bottom-up q(z_1|x) q(z_2|z_1)..., per-layer KL and active units."""

    config_class = HierarchicalConfig
    scheduled_values = ("beta",)
    reads_mc_samples = True
    compiles_faster = True  # its many small layers: compiling fuses them (BENCHMARKS.md)

    def __init__(self, config: HierarchicalConfig):
        super().__init__(config)
        dims, widths = config.latent_dims, config.widths()
        # p(z_l | z_{l+1}) for l = 1..L-1 (index l-1): the block under z_{l+1} mirrors the encoder's
        self.top_down = nn.ModuleList(GaussianHead(dims[i + 1], widths[i + 1], dims[i], config)
                                      for i in range(len(dims) - 1))

    def build_encoder(self, config: HierarchicalConfig) -> nn.Module:
        dims, widths = config.latent_dims, config.widths()
        return nn.ModuleList(GaussianHead(config.input_dim if i == 0 else dims[i - 1], widths[i], dims[i], config)
                             for i in range(len(dims)))

    def build_decoder(self, config: HierarchicalConfig, input_dim: int) -> nn.Module:
        block = Block(config.latent_dims[0], config.widths()[0], config.depth, config.activation, config.batch_norm)
        return nn.Sequential(block, nn.Linear(block.out_dim, self.likelihood_head.outputs_per_dim * config.input_dim))

    # ----- the generative model (shared with the ladder VAE) -----
    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        if z.shape[-1] != self.config.latent_dim:
            raise ElbolabError(f"{self.registry_name}: expected the joint z [..., {self.config.latent_dim}] = "
                               f"cat(z1..zL), got {tuple(z.shape)}")
        return list(torch.split(z, list(self.config.latent_dims), -1))

    def top_prior(self) -> Independent:
        return standard_normal_prior(self.config.latent_dims[-1], next(self.parameters()))

    def conditional_priors(self, zs: list[torch.Tensor]) -> list[Distribution]:
        """[p(z_1|z_2), ..., p(z_{L-1}|z_L), p(z_L)] given the layers ``zs`` (each ``[..., d_l]``)."""
        return [diagonal_normal(*net(zs[i + 1])[1:]) for i, net in enumerate(self.top_down)] + [self.top_prior()]

    def prior(self, batch: Batch | None = None) -> HierarchicalPrior:
        return HierarchicalPrior(self)

    def decode(self, z: torch.Tensor, batch: Batch | None = None):
        """p(x | z_1) for the joint z ``[..., latent_dim]``."""
        return self.likelihood_head(full_precision(self.decoder(self.split(z)[0])))

    def decode_mean(self, z: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.likelihood_head.mean(full_precision(self.decoder(self.split(z)[0])))

    # ----- inference: the ladder VAE overrides infer (and layer_kl) -----
    def encode(self, batch: Batch | torch.Tensor):
        raise ElbolabError(f"{self.registry_name}: q(z|x) is a chain of conditionals, not one distribution; use "
                           "importance_samples, latent_means or kl_terms (methods needing a single q do not apply)")

    def infer(self, x: torch.Tensor, draw) -> tuple[list[torch.Tensor], list[Distribution], list | None]:
        """Layers z_l = draw(q_l), the q_l and (when inference computed them) the p(z_l|z_{l+1}); bottom first."""
        zs, qs, h = [], [], x  # x [B, D]
        for head in self.encoder:
            q = diagonal_normal(*head(h)[1:])  # q(z_1|x) [B] or q(z_l|z_{l-1}) [k, B]
            zs.append(draw(q))
            qs.append(q)
            h = zs[-1]
        return zs, qs, None

    def joint(self, batch: Batch, k: int, reparameterize: bool = True):
        """k joint draws from q: (zs [k, B, d_l] each, the q_l and the p_l, each with batch [k, B])."""
        zs, qs, ps = self.infer(as_batch(batch).x, _sampler(k, reparameterize))
        return zs, qs, ps if ps is not None else self.conditional_priors(zs)

    def layer_kl(self, i: int, zs, qs, ps) -> torch.Tensor:
        """Layer i's KL term per dimension, ``[k, B, d_i]``: closed form at the top, one-draw estimate below."""
        q, p = qs[i].base_dist, ps[i].base_dist
        if i == len(zs) - 1:
            return kl_divergence(q, p).expand_as(zs[i])
        return q.log_prob(zs[i]) - p.log_prob(zs[i])

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        zs, qs, ps = self.joint(batch, ctx.mc_samples)  # L draws
        recon = self.decode(torch.cat(zs, -1), batch).log_prob(batch.x).mean(0)  # [B]
        kls = [self.layer_kl(i, zs, qs, ps).sum(-1).mean(0) for i in range(len(zs))]  # [B] per layer
        kl = torch.stack(kls).sum(0)  # [B]
        loss = -recon.mean() + ctx.value("beta", 1.0) * kl.mean()
        metrics = {"elbo": recon - kl, "kl": kl, "recon": recon}
        metrics.update({f"kl_z{i + 1}": kl_i.detach() for i, kl_i in enumerate(kls)})
        return LossOutput({"model": loss}, metrics)

    def importance_samples(self, batch: Batch | torch.Tensor, k: int, *, reparameterize: bool = False,
                           stop_q_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """k joint draws z ~ q(z|x), returned as cat(z_1..z_L) ``[k, B, latent_dim]``, and log w ``[k, B]``."""
        if stop_q_grad:
            raise ElbolabError(f"{self.registry_name}: stop_q_grad (STL/DReG) is not defined here: q's parameters "
                               "depend on sampled layers; train with the ELBO")
        batch = as_batch(batch)
        zs, qs, ps = self.joint(batch, k, reparameterize)
        z = torch.cat(zs, -1)  # [k, B, latent_dim]
        log_w = self.decode(z, batch).log_prob(batch.x)  # [k, B]
        for z_l, q, p in zip(zs, qs, ps):
            log_w = log_w + p.log_prob(z_l) - q.log_prob(z_l)
        return z, log_w

    # ----- diagnostics -----
    def collapse_remedies(self) -> list[str]:
        extra = [] if self.config.batch_norm else ["batch normalisation (--set batch_norm=true; Sonderby et al.)"]
        return extra + ["fewer or smaller stochastic layers (--set latent_dims=...)"]

    def latent_means(self, batch: Batch | torch.Tensor) -> dict[str, torch.Tensor]:
        """E_q[z_l|x] per layer, ``{"z1": [B, d_1], ...}``, for the active units: ``sampled_means`` over
        ``mean_samples`` joint draws (seeded), or the mean pass when ``mean_samples`` is 0."""
        if self.config.mean_samples == 0:
            return self.mean_pass(batch)
        return self.sampled_means(batch, self.config.mean_samples)

    def mean_pass(self, batch: Batch | torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's q-mean with its parents at their q-means, ``{"z1": [B, d_1], ...}``: E_q[z_l|x] for the
        layer drawn first (hvae: z_1, ladder: z_L) and for linear layers only, since E[f(z)] != f(E[z])."""
        zs, _, _ = self.infer(as_batch(batch).x, lambda q: q.mean)
        return {f"z{i + 1}": z for i, z in enumerate(zs)}

    def sampled_means(self, batch: Batch | torch.Tensor, samples: int, *, rows: int = 2 ** 15,
                      seed: int = 0) -> dict[str, torch.Tensor]:
        """E_q[z_l|x] by Monte-Carlo, ``{"z1": [B, d_1], ...}``: over ``samples`` joint draws of the hierarchy, the
        mean of each layer's q-mean given its sampled parents (Rao-Blackwellised, E_q[z_l|x] = E_q[mean of
        q(z_l|parents)]); drawn about ``rows`` (draw, example) pairs at a time from torch's generator seeded with
        ``seed`` in a forked RNG state: the same batch gives the same means, and the caller's RNG is untouched."""
        x = as_batch(batch).x  # [B, D]
        chunk = max(1, rows // len(x))
        totals = [x.new_zeros(len(x), d) for d in self.config.latent_dims]  # [B, d_l] each
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for done in range(0, samples, chunk):
                n = min(chunk, samples - done)
                _, qs, _ = self.infer(x, _sampler(n, False))
                for total, q in zip(totals, qs):  # q.mean [n, B, d_l], or [B, d_l] for the layer drawn first
                    total += torch.broadcast_to(q.mean, (n, *total.shape)).sum(0)
        return {f"z{i + 1}": total / samples for i, total in enumerate(totals)}

    def kl_terms(self, batch: Batch | torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's KL term per dimension for one joint draw, ``{"z1": [B, d_1], ...}``; they sum to the KL
        part of the ELBO (a one-draw estimate)."""
        zs, qs, ps = self.joint(batch, 1, reparameterize=False)
        return {f"z{i + 1}": self.layer_kl(i, zs, qs, ps)[0] for i in range(len(zs))}

    @torch.no_grad()
    def reconstruct(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        batch = as_batch(batch)
        return self.decode_mean(torch.cat(list(self.mean_pass(batch).values()), -1), batch)  # a picture: cheap


def _sampler(k: int, reparameterize: bool):
    """draw(q): k draws from a q with batch [B] (the first layer), one draw from a q with batch [k, B]."""
    def draw(q: Distribution) -> torch.Tensor:
        shape = (k,) if len(q.batch_shape) == 1 else ()
        return q.rsample(shape) if reparameterize else q.sample(shape)
    return draw
