"""Network builders and Gaussian encoders.

An encoder returns the distribution q(z|x):

* diagonal:  q(z|x) = N(mu(x), diag(exp(logvar(x))))                         (notes 000 eq. 6, notes 001 eq. 29)
* full:      q(z|x) = N(mu(x), L(x) L(x)^T), L lower triangular with a positive diagonal, so that
             z = mu + L eps, eps ~ N(0, I), and log q(z) = log N(eps; 0, I) - log|det dz/deps|
             with log|det dz/deps| = sum_i log L_ii  (Kingma & Welling 2019, "An Introduction to VAEs", s2.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from elbolab.errors import ElbolabError
from elbolab.objectives import STANDARD_NORMAL_MARK

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "softplus": nn.Softplus, "gelu": nn.GELU}
COVARIANCES = ("diag", "full")


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ElbolabError(f"expected an activation in {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def mlp(sizes: Sequence[int], act: str = "relu", final_activation: bool = False) -> nn.Sequential:
    """Linear layers sizes[0] -> ... -> sizes[-1] with ``act`` between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def _check_conv_shape(image_shape) -> tuple[int, int, int]:
    """(C, H, W) with H and W divisible by 4; (H, W) is read as one channel."""
    shape = tuple(image_shape or ())
    shape = (1, *shape) if len(shape) == 2 else shape
    if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
        raise ElbolabError(
            f"expected images with height and width divisible by 4 for the conv architecture, got {image_shape}; "
            "try --arch mlp"
        )
    return shape


def conv_encoder_body(image_shape, act: str = "relu", channels=(32, 64)) -> tuple[nn.Module, int]:
    """Two stride-2 convolutions: [B, C*H*W] -> [B, c2 * H/4 * W/4]. Returns the module and its output width."""
    c, h, w = _check_conv_shape(image_shape)
    c1, c2 = channels
    body = nn.Sequential(
        nn.Unflatten(-1, (c, h, w)),
        nn.Conv2d(c, c1, 4, stride=2, padding=1), activation(act),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1), activation(act),
        nn.Flatten(),
    )
    return body, c2 * (h // 4) * (w // 4)


class ConvDecoder(nn.Module):
    """Mirror of ``conv_encoder_body``: [..., latent] -> [..., outputs * C * H * W] (channel-major per output)."""

    def __init__(self, latent_dim: int, image_shape, outputs: int = 1, act: str = "relu", channels=(64, 32)):
        super().__init__()
        c, h, w = _check_conv_shape(image_shape)
        c1, c2 = channels
        self.start = (c1, h // 4, w // 4)
        self.fc = nn.Sequential(nn.Linear(latent_dim, c1 * (h // 4) * (w // 4)), activation(act))
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(c1, c2, 4, stride=2, padding=1), activation(act),
            nn.ConvTranspose2d(c2, outputs * c, 4, stride=2, padding=1),
        )

    def forward(self, z):
        lead = z.shape[:-1]  # e.g. [L, B]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start)
        out = self.deconv(h)  # [N, outputs * C, H, W]
        return out.reshape(*lead, -1)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """A network output in float32 when autocast made it bfloat16 or float16 (float64 stays float64): distributions
    are built from full-precision parameters (see ``elbolab.precision``)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class GaussianEncoder(nn.Module):
    """body(x) -> features -> q(z|x), diagonal or full covariance."""

    def __init__(self, body: nn.Module, feature_dim: int, latent_dim: int, covariance: str = "diag"):
        super().__init__()
        if covariance not in COVARIANCES:
            raise ElbolabError(f"expected encoder covariance in {COVARIANCES}, got {covariance!r}")
        self.body, self.latent_dim, self.covariance = body, latent_dim, covariance
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.log_var = nn.Linear(feature_dim, latent_dim)
        if covariance == "full":
            n_off = latent_dim * (latent_dim - 1) // 2
            self.off_diagonal = nn.Linear(feature_dim, n_off)
            nn.init.zeros_(self.off_diagonal.weight)  # start diagonal; correlations are learned
            nn.init.zeros_(self.off_diagonal.bias)
            self.register_buffer("tril_index", torch.tril_indices(latent_dim, latent_dim, offset=-1), persistent=False)

    def forward(self, x: torch.Tensor):
        h = self.body(x)  # [B, H]
        # float32 from here on under mixed precision: log q and the KL must not be computed in bfloat16
        loc = full_precision(self.loc(h))  # [B, d]
        scale_diag = torch.exp(0.5 * full_precision(self.log_var(h)))  # [B, d]
        if self.covariance == "diag":
            return Independent(Normal(loc, scale_diag, validate_args=False), 1)
        tril = torch.diag_embed(scale_diag)  # [B, d, d]
        rows, cols = self.tril_index
        tril[..., rows, cols] = full_precision(self.off_diagonal(h))
        return MultivariateNormal(loc, scale_tril=tril, validate_args=False)


def standard_normal_prior(latent_dim: int, like: torch.Tensor) -> Independent:
    """p(z) = N(0, I) as an Independent Normal on the device and dtype of ``like``."""
    zeros = like.new_zeros(latent_dim)
    prior = Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1)
    setattr(prior, STANDARD_NORMAL_MARK, True)  # objectives.elbo_terms: no need to check the values
    return prior


def precision_weighted_merge(mu_a: torch.Tensor, var_a: torch.Tensor, mu_b: torch.Tensor,
                             var_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised product of N(mu_a, var_a) and N(mu_b, var_b), elementwise: (mu, var) with
    var = 1 / (1/var_a + 1/var_b) and mu = var (mu_a/var_a + mu_b/var_b).

    The Ladder VAE's merge of the bottom-up and top-down estimates (Sønderby et al. 2016 eq. 18-19). Both results
    are variances (notes 004 write sigma for this variance).
    """
    precision_a, precision_b = var_a.reciprocal(), var_b.reciprocal()
    var = (precision_a + precision_b).reciprocal()
    return var * (mu_a * precision_a + mu_b * precision_b), var


class MixturePrior(nn.Module):
    """A learnable Gaussian-mixture prior p(z) = sum_c pi_c N(z; mu_c, Sigma_c), as a MixtureSameFamily.

    For VaDE (Jiang et al. 2017) and other mixture priors; the parameters are free. ``covariance="diag"``:
    Sigma_c = diag(exp(log_var_c)), the components ``Independent(Normal)``. ``covariance="full"``: Sigma_c = L_c L_c^T
    with L_c lower triangular, diagonal exp(log_var_c / 2) and free entries below it (``lower``), the components a
    ``MultivariateNormal``; it starts as the diagonal one.
    """

    def __init__(self, n_components: int, latent_dim: int, spread: float = 1.0, covariance: str = "diag"):
        super().__init__()
        if n_components < 1 or latent_dim < 1:
            raise ElbolabError(f"expected n_components >= 1 and latent_dim >= 1, got {n_components}, {latent_dim}")
        if covariance not in ("diag", "full"):
            raise ElbolabError(f"expected covariance diag or full, got {covariance!r}")
        self.covariance = covariance
        self.logits = nn.Parameter(torch.zeros(n_components))
        self.means = nn.Parameter(spread * torch.randn(n_components, latent_dim))
        self.log_var = nn.Parameter(torch.zeros(n_components, latent_dim))
        if covariance == "full":  # only the strictly lower triangle is used
            self.lower = nn.Parameter(torch.zeros(n_components, latent_dim, latent_dim))

    def scale_tril(self) -> torch.Tensor:
        """L_c, ``[K, d, d]`` (for ``diag``, the diagonal matrices)."""
        tril = torch.diag_embed(torch.exp(0.5 * self.log_var))  # [K, d, d]
        return tril + self.lower.tril(-1) if self.covariance == "full" else tril

    def forward(self) -> MixtureSameFamily:
        if self.covariance == "full":
            components = MultivariateNormal(self.means, scale_tril=self.scale_tril(), validate_args=False)
        else:
            components = Independent(Normal(self.means, torch.exp(0.5 * self.log_var), validate_args=False), 1)
        return MixtureSameFamily(Categorical(logits=self.logits, validate_args=False), components,
                                 validate_args=False)

    @torch.no_grad()
    def set(self, weights, means, covariances) -> None:
        """Set pi ``[K]``, mu_c ``[K, d]`` and the covariances: variances ``[K, d]`` (either kind of prior) or, for a
        full prior, positive-definite matrices ``[K, d, d]``."""
        like = self.logits
        self.logits.copy_(torch.as_tensor(weights).to(like).log())
        self.means.copy_(torch.as_tensor(means).to(like))
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        if covariances.dim() == 2:
            self.log_var.copy_(covariances.log().to(like))
            if self.covariance == "full":
                self.lower.zero_()
            return
        if self.covariance != "full":
            raise ElbolabError(f"a diagonal mixture prior takes variances [K, d], got matrices "
                               f"{tuple(covariances.shape)}; give their diagonals, or use a full-covariance prior")
        tril = torch.linalg.cholesky(covariances)  # [K, d, d], in float64 for accuracy
        self.log_var.copy_((2 * tril.diagonal(dim1=-2, dim2=-1).log()).to(like))
        self.lower.copy_(tril.tril(-1).to(like))

