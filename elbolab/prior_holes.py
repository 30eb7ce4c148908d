"""Prior holes (notes 001 s2.5, Fig. 2): regions that the prior p(z) (N(0, I), or a Gaussian mixture such as the
VampPrior's, projected to the plane component by component) covers but that no training code reaches, so the
decoder never learned what to put there and samples drawn there look poor.

The codes actually used are the aggregated posterior (Hoffman & Johnson 2016, "ELBO surgery";
Makhzani et al. 2016), estimated from n encoded points,

    q(z) = 1/n sum_{i=1}^{n} q(z | x_i)                (a MixtureSameFamily of the encoders' Gaussians)

and the hole mass is the prior probability of the region where q(z) falls below a fraction t of p(z):

    H_t = P_{z ~ p}[ q(z) / p(z) < t ]  ~  1/S sum_s 1[q(z_s)/p(z_s) < t],  z_s ~ p(z),   s.e. sqrt(H (1 - H) / S).

It is measured in a plane: the latent space itself when d = 2; otherwise the first two principal axes P [d, 2]
(orthonormal) of the latent means E_q[z|x_i]. Both densities are then exact marginals on that plane: p(P^T z) is
N(0, I_2) and q(P^T z) the mixture of N(P^T mu_i, P^T Sigma_i P). A full-space number (the same ratio in all d
dimensions) is reported beside it; in many dimensions almost all the prior mass is a "hole" by this measure.

Decoded examples: z ~ p(z) in the full space, sorted by the plane's ratio into holes (q/p < t) and well-covered
regions (q/p > ``covered``, default 1: the codes are denser than the prior there).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, MultivariateNormal, Normal

from elbolab import runs
from elbolab.data.core import as_batch
from elbolab.errors import ElbolabError
from elbolab.figures.prior_holes import plot_prior_holes
from elbolab.loading import load_run, load_run_data
from elbolab.progress import Progress

THRESHOLD = 0.1  # q(z)/p(z) below this: a hole
COVERED = 1.0  # q(z)/p(z) above this: well covered


def posterior_gaussians(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [n, d] and covariances [n, d, d] of q(z|x_i) for the batch (a diagonal or full-covariance encoder)."""
    q = model.encode(as_batch(batch))
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        return q.mean, torch.diag_embed(q.variance)
    if isinstance(q, MultivariateNormal):
        return q.loc, q.covariance_matrix
    raise ElbolabError(f"prior holes: expected a Gaussian q(z|x) (Independent Normal or MultivariateNormal), got "
                       f"{type(q).__name__}")


def principal_plane(means: torch.Tensor) -> tuple[torch.Tensor, str]:
    """An orthonormal basis P [d, 2] of the plane and how it was chosen: the latent axes when d = 2, otherwise the
    first two principal axes of the (centred) latent means [n, d]."""
    d = means.shape[-1]
    if d < 2:
        raise ElbolabError(f"prior holes: expected a latent space of 2 or more dimensions, got {d}")
    if d == 2:
        return torch.eye(2, dtype=means.dtype, device=means.device), "latent axes z1, z2"
    _, _, vh = torch.linalg.svd(means - means.mean(0), full_matrices=False)
    return vh[:2].T.contiguous(), "first two principal axes of E[z|x]"


def aggregated_posterior(means: torch.Tensor, covariances: torch.Tensor, basis: torch.Tensor | None = None
                         ) -> MixtureSameFamily:
    """q(z) = 1/n sum_i N(P^T mu_i, P^T Sigma_i P) (batch [], event [k]); P = identity when ``basis`` is None."""
    if basis is not None:
        means, covariances = means @ basis, basis.T @ covariances @ basis  # [n, k], [n, k, k]
    n = means.shape[0]
    components = MultivariateNormal(means, covariance_matrix=covariances, validate_args=False)
    return MixtureSameFamily(Categorical(logits=means.new_zeros(n), validate_args=False), components,
                             validate_args=False)


def density_ratio(q: Distribution, p: Distribution, z: torch.Tensor, chunk: int = 2048,
                  progress: Progress | None = None) -> torch.Tensor:
    """log q(z) - log p(z) for z [S, k], in chunks (a mixture of n components costs n * chunk at a time): [S]."""
    parts = []
    for part in z.split(chunk):
        parts.append(q.log_prob(part) - p.log_prob(part))
        if progress is not None:
            progress.update(len(part))
    return torch.cat(parts)


def hole_mass(q: Distribution, p: Distribution, *, threshold: float = THRESHOLD, n_samples: int = 100_000,
              seed: int = 0, z: torch.Tensor | None = None, log_ratio: torch.Tensor | None = None,
              progress: Progress | None = None) -> dict:
    """P_{z~p}[q(z)/p(z) < threshold] by Monte Carlo with its standard error: {"mass", "se", "threshold",
    "n_samples"}; ``z`` (draws of p) may be given instead of drawing ``n_samples``, or their ``log_ratio``
    log q(z) - log p(z) when already computed."""
    if not threshold > 0:
        raise ElbolabError(f"prior holes: expected a threshold > 0, got {threshold!r}; try 0.1")
    if log_ratio is None:
        if z is None:
            generator = torch.Generator().manual_seed(seed)
            z = p.mean + p.stddev * torch.randn(n_samples, *p.event_shape, generator=generator, dtype=p.mean.dtype)
        log_ratio = density_ratio(q, p, z, progress=progress)  # [S]
    holes = (log_ratio < math.log(threshold)).double()
    mass = float(holes.mean())
    return {"mass": mass, "se": math.sqrt(mass * (1 - mass) / len(holes)), "threshold": threshold,
            "n_samples": len(holes)}


def _is_standard_normal(prior: Distribution) -> bool:
    return (isinstance(prior, Independent) and isinstance(prior.base_dist, Normal) and prior.batch_shape == ()
            and bool((prior.base_dist.loc == 0).all()) and bool((prior.base_dist.scale == 1).all()))


def prior_in_plane(prior: Distribution, basis: torch.Tensor) -> tuple[Distribution, str]:
    """The prior's marginal in the plane z -> P^T z (P [d, 2] orthonormal) and its name: N(0, I_2) for N(0, I); for
    a Gaussian mixture (VampPrior, VaDE's) the mixture of the projected components N(P^T m_k, P^T S_k P). Anything
    else is refused: its marginal in the plane has no closed form here."""
    if _is_standard_normal(prior):
        return Independent(Normal(basis.new_zeros(2), basis.new_ones(2)), 1), "N(0, I)"
    if isinstance(prior, MixtureSameFamily) and prior.batch_shape == ():
        components = prior.component_distribution
        if isinstance(components, Independent) and isinstance(components.base_dist, Normal):
            covariances = torch.diag_embed(components.base_dist.scale ** 2)  # [K, d, d]
        elif isinstance(components, MultivariateNormal):
            covariances = components.covariance_matrix  # [K, d, d]
        else:
            covariances = None
        if covariances is not None:
            projected = MultivariateNormal(components.mean @ basis, covariance_matrix=basis.T @ covariances @ basis,
                                           validate_args=False)  # [K] components, event [2]
            name = f"a mixture of {components.batch_shape[0]:,} Gaussians"
            return MixtureSameFamily(prior.mixture_distribution, projected, validate_args=False), name
    raise ElbolabError(f"prior holes: expected a model with the N(0, I) prior or a Gaussian-mixture prior "
                       f"(VampPrior, VaDE), got {type(prior).__name__}; its marginal in the plane has no closed form "
                       "here (not supported)")


def _on_cpu(plane: Distribution) -> Distribution:
    if isinstance(plane, MixtureSameFamily):
        c = plane.component_distribution
        return MixtureSameFamily(Categorical(logits=plane.mixture_distribution.logits.cpu(), validate_args=False),
                                 MultivariateNormal(c.loc.cpu(), scale_tril=c.scale_tril.cpu(), validate_args=False),
                                 validate_args=False)
    return Independent(Normal(plane.base_dist.loc.cpu(), plane.base_dist.scale.cpu()), 1)


@torch.no_grad()
def analyse(model, data, *, n_points: int = 2000, threshold: float = THRESHOLD, covered: float = COVERED,
            n_samples: int = 100_000, n_images: int = 30, seed: int = 0, progress: bool = True) -> dict:
    """Hole mass in the plane and in the full space, the plane, the aggregated posterior there and decoded
    samples from holes and from well-covered regions, for a model and a data split."""
    model.eval()
    param = next(model.parameters())
    prior = model.prior()
    prior_in_plane(prior, torch.eye(prior.event_shape[0], 2))  # refused before any work when not supported
    n = min(n_points, len(data))
    batch = data.batch(torch.arange(n), torch.Generator().manual_seed(seed)).to(param)
    means, covariances = posterior_gaussians(model, batch)  # [n, d], [n, d, d]
    basis, plane = principal_plane(means)
    d = means.shape[1]
    q_plane = aggregated_posterior(means, covariances, basis)
    p_plane, prior_name = prior_in_plane(prior, basis)
    if prior_name == "N(0, I)":
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(n_samples, d, generator=generator).to(param)  # [S, d] ~ p(z)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            z = prior.sample((n_samples,))  # [S, d] ~ p(z)
    z_plane = z @ basis  # [S, 2] ~ p_plane: the projection of a draw is a draw of the projected distribution
    full_samples = min(10_000, n_samples) if d > 2 else 0
    with Progress(f"prior holes: q(z)/p(z) at {n_samples:,} prior draws (a mixture of {n:,} posteriors)"
                  + (f", then {full_samples:,} in the full {d}-d space" if full_samples else ""),
                  total=n_samples + full_samples, unit="draws", enabled=progress) as bar:
        log_ratio = density_ratio(q_plane, p_plane, z_plane, progress=bar)  # [S]
        result = {"plane": plane, "basis": basis.cpu(), "n_points": n, "latent_dim": d, "covered": covered,
                  "prior_name": prior_name,
                  **hole_mass(q_plane, p_plane, threshold=threshold, log_ratio=log_ratio)}
        full = hole_mass(aggregated_posterior(means, covariances), prior, threshold=threshold,
                         z=z[:full_samples], progress=bar) if full_samples else None
    if full is not None:
        result["full_space"] = {"mass": full["mass"], "se": full["se"], "n_samples": full["n_samples"]}
    holes, good = log_ratio < math.log(threshold), log_ratio > math.log(covered)
    result["covered_mass"] = float(good.double().mean())
    result["hole_z"], result["covered_z"] = z[holes][:n_images].cpu(), z[good][:n_images].cpu()
    if model.config.image_shape is not None:
        result["hole_images"] = model.decode_mean(z[holes][:n_images]).cpu()
        result["covered_images"] = model.decode_mean(z[good][:n_images]).cpu()
    result["aggregated_posterior"] = aggregated_posterior(means.cpu(), covariances.cpu(), basis.cpu())
    result["means_plane"] = (means @ basis).cpu()  # [n, 2]
    result["prior_plane"] = _on_cpu(p_plane)  # for the figure
    return result


def prior_holes(run_dir, *, split: str = "test", n_points: int = 2000, threshold: float = THRESHOLD,
                covered: float = COVERED, n_samples: int = 100_000, n_images: int = 30, seed: int = 0,
                figures: bool = True) -> dict:
    """The prior-hole analysis of a trained run (an N(0, I) or a Gaussian-mixture prior) on ``split``: a JSON-ready
    dict {"mass", "se", "threshold", "covered", "covered_mass", "n_samples", "n_points", "plane", "latent_dim",
    "full_space" (d > 2), "prior_name", "figures"}; with ``figures`` the density figure
    (run_dir/figures/prior_holes.png) is drawn."""
    if split not in ("train", "val", "test"):
        raise ElbolabError(f"prior holes: expected split train, val or test, got {split!r}")
    model, config = load_run(run_dir)
    if not model.has_posterior:
        raise ElbolabError(
            f"prior holes: the {config['model']} in {run_dir} has no q(z|x): prior holes need a model with a "
            "posterior, e.g. vae"
        )
    data = getattr(load_run_data(config["data"]), split)
    result = analyse(model, data, n_points=n_points, threshold=threshold, covered=covered, n_samples=n_samples,
                     n_images=n_images, seed=seed)
    paths = []
    if figures:
        paths.append(plot_prior_holes(result, Path(run_dir) / runs.FIGURES / "prior_holes.png",
                                      image_shape=model.config.image_shape))
    keep = ("mass", "se", "threshold", "covered", "covered_mass", "n_samples", "n_points", "plane", "latent_dim",
            "full_space", "prior_name")
    return {**{k: result[k] for k in keep if k in result}, "split": split, "figures": [str(p) for p in paths]}
