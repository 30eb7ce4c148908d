"""A VAE whose q(z|x) is a diagonal Gaussian pushed through normalizing flows: planar (Rezende & Mohamed 2015,
"Variational inference with normalizing flows") or inverse autoregressive (Kingma, Salimans, Jozefowicz, Chen,
Sutskever & Welling 2016, "Improved variational inference with inverse autoregressive flow").

q_0(z_0|x) = N(mu(x), diag sigma^2(x)) is the encoder's Gaussian; z_K = f_K o ... o f_1(z_0) with invertible f_k.
Change of variables (Rezende & Mohamed, finite flows; Kingma et al., the same chain for IAF):

    log q_K(z_K|x) = log q_0(z_0|x) - sum_{k=1}^{K} log |det d f_k / d z_{k-1}|

Objective, per example (Rezende & Mohamed's flow-based free energy, negated; the VAE's loss with the KL by Monte
Carlo, ``objectives.kl_term``):

    L(x) = E_{q_0(z_0|x)} [ log p(x | z_K) + log p(z_K) - log q_0(z_0|x) + sum_k log |det d f_k / d z_{k-1}| ]

with beta on the KL part, 1/L sum_l [log q_K(z_K^l) - log p(z_K^l)], as in the VAE (beta and a capacity target;
free bits need a per-dimension KL, which a flow does not have).

* planar: f(z) = z + u_hat h(w^T z + b), h = tanh, log |det| = log |1 + u_hat^T psi(z)|, psi(z) = h'(w^T z + b) w
  (R&M, planar flows). Invertible when w^T u_hat >= -1, enforced by their reparameterisation (R&M appendix A)
  u_hat = u + (m(w^T u) - w^T u) w / ||w||^2, m(a) = -1 + log(1 + e^a). The inverse has no closed form; it is
  computed here by bisection on the scalar equation a + (w^T u_hat) tanh(a + b) = w^T y for a = w^T z (strictly
  increasing in a), then z = y - u_hat tanh(a + b). Training and importance sampling never use it: samples from
  ``rsample`` keep their pre-images in each transform's cache (``cache_size=1``).
* iaf: [m, s] = MADE(z, h(x)), an autoregressive network (Germain et al. 2015) whose outputs i see only the z_j
  earlier than i in the step's order (and the encoder's features h(x), the IAF paper's context); sigma = sigmoid(s),
  z' = sigma * z + (1 - sigma) * m, log |det| = sum_i log sigma_i (Kingma et al.'s numerically stable form of the
  IAF step; s starts near +2 as they suggest). Steps alternate between the natural and the reversed order.

The planar parameters (u, w, b) are amortised by default, output for each x by a linear layer on the encoder's
features as in Rezende & Mohamed (the flow adapts to each posterior); ``amortized=false`` learns one global set per
model. The IAF is conditioned on the same features (``amortized=false``: no context). Planar flows start as the
identity (u_hat = 0), so a fresh flow-vae is the plain VAE.

Set with ``--set flow=iaf --set flows=8``; ``flows=0`` is the plain VAE (closed-form KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Independent, Normal, Transform, TransformedDistribution

from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.flows import IAFFlows, PlanarFlows
from elbolab.models.base import option
from elbolab.models.registry import register_model
from elbolab.models.vae import VAE, VAEConfig
from elbolab.networks import full_precision

FLOWS = ("planar", "iaf")


@dataclass(frozen=True)
class FlowVAEConfig(VAEConfig):
    flow: str = option("planar", "the flow after q_0(z|x): planar | iaf")
    flows: int = option(4, "flow steps K (0: the plain VAE)")
    amortized: bool = option(True, "flow parameters (planar) or context (iaf) from the encoder's features; false: "
                             "one global flow per model")
    flow_hidden: int = option(64, "hidden units of each IAF step's autoregressive network (MADE)")

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.flow in FLOWS, f"flow in {', '.join(FLOWS)}", self.flow),
            (self.flows >= 0, "flows >= 0 steps", self.flows),
            (self.flow_hidden >= 1, "flow_hidden >= 1 units", self.flow_hidden),
            (self.encoder_covariance == "diag", "encoder_covariance diag (q_0 is the diagonal Gaussian of both "
             "papers; the flow adds the correlations)", self.encoder_covariance),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"flow-vae: expected {expected}, got {got!r}")


@register_model("flow-vae")
class FlowVAE(VAE):
    """VAE with a normalizing-flow posterior: a diagonal Gaussian through planar or IAF steps."""

    config_class = FlowVAEConfig
    scheduled_values = ("beta", "capacity")  # no free bits: a flow's q has no per-dimension KL
    compiles_faster = True

    def __init__(self, config: FlowVAEConfig):
        super().__init__(config)
        context = self.encoder.loc.in_features if config.amortized else None  # the width of the features h(x)
        if config.flows == 0:
            self.flow = None
        elif config.flow == "planar":
            self.flow = PlanarFlows(config.flows, config.latent_dim, context)
        else:
            self.flow = IAFFlows(config.flows, config.latent_dim, config.flow_hidden, context, config.activation)

    def base_and_transforms(self, batch: Batch | torch.Tensor) -> tuple[Independent, list[Transform]]:
        """q_0(z_0|x) (batch [B], event [d]) and the flow's transforms for this batch (fresh caches)."""
        h = self.encoder.body(as_batch(batch).x)  # [B, H]: the features the flow is amortised on
        loc = full_precision(self.encoder.loc(h))
        scale = torch.exp(0.5 * full_precision(self.encoder.log_var(h)))
        base = Independent(Normal(loc, scale, validate_args=False), 1)
        return base, ([] if self.flow is None else self.flow.transforms(h))

    def encode(self, batch: Batch | torch.Tensor):
        """q_K(z|x): ``TransformedDistribution(q_0, flows)`` (q_0 itself when flows=0); batch [B], event [d]."""
        base, transforms = self.base_and_transforms(batch)
        return TransformedDistribution(base, transforms, validate_args=False) if transforms else base

    def q_parameters(self) -> list[nn.Parameter]:
        return super().q_parameters() + ([] if self.flow is None else list(self.flow.parameters()))

    def latent_means(self, batch: Batch | torch.Tensor) -> dict[str, torch.Tensor]:
        """f_K o ... o f_1(mu(x)), the flow applied to the base mean, ``{"z": [B, d]}``: a point summary of q_K,
        not E_q[z] (the image of a mean under a non-linear map is not the mean of the image)."""
        base, transforms = self.base_and_transforms(batch)
        z = base.mean
        for transform in transforms:
            z = transform(z)
        return {"z": z}

    def kl_terms(self, batch: Batch | torch.Tensor) -> dict[str, torch.Tensor] | None:
        """None with flows: q_K does not factorise over dimensions, so there is no per-dimension KL."""
        return super().kl_terms(batch) if self.flow is None else None
