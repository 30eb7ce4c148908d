"""Per-datapoint (non-amortised) variational inference and the amortisation gap.

Non-amortised VI (notes 001 s2.2; notes 004 "amortized inference") gives every data point its own variational
parameters lambda_i = (mu_i, log sigma_i^2) and maximises its ELBO directly:

    lambda_i* = argmax_lambda  E_{q_lambda(z)} [log p(x_i | z) + log p(z)] - H-term,   q_lambda = N(mu, diag sigma^2)

An encoder instead predicts lambda_i = f_phi(x_i). Cremer, Li & Duvenaud (2018, "Inference suboptimality in
variational autoencoders") split the gap between log p(x) and the amortised ELBO in two:

    log p(x) - ELBO(q_phi)  =  [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q_phi)]
                            =   approximation gap     +   amortisation gap

where q* is the best member of the variational family for x, found here by fitting lambda_i at test time.
Works for any model with ``decode(z, batch)`` and ``prior(batch)``.

log p(x) itself is unknown and must be estimated as well as possible: Cremer et al. take the better of IWAE with
the locally optimised q and AIS. An importance-sampled estimate with proposal r(z),

    log p^_K(x) = log 1/K sum_k p(x | z_k) p(z_k) / r(z_k),   z_k ~ r,

is a stochastic lower bound for any r (E[log p^_K] <= log p(x), Jensen), but how far below depends on r: with a
poor amortised q_phi as r it falls short. The amortisation gap ELBO(q*) - ELBO(q_phi) does not involve log p(x);
the shortfall comes off the approximation gap (which can even turn negative) and the total, so the amortisation
gap's share of the total is overstated. ``amortization_gap`` therefore uses the fitted q* as the proposal by
default (``importance_sampled_log_px_from``), optionally also q_phi and AIS (``elbolab.ais``), keeping the largest
estimate per example. A mean-field q* is itself under-dispersed along correlated directions of the posterior;
where its variance falls below half the posterior's, the importance weights have infinite variance and the
ESS-based s.e. is optimistic (AIS does not have this weakness).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from elbolab.ais import ais_log_px
from elbolab.data.core import Batch, as_batch
from elbolab.errors import ElbolabError
from elbolab.estimators import (
    LogLikelihoodEstimate,
    check_inputs,
    chunked_log_mean_exp,
    model_tensor,
    plan_chunks,
    sample_width,
    summarize_log_px,
)
from elbolab.objectives import kl_term

PROPOSALS = ("optimal", "amortized", "both")  # the importance-sampling proposals amortization_gap can use


@dataclass
class LocalPosterior:
    """The fitted per-datapoint q(z) = N(loc, diag scale^2) (batch [B], event [d]) and its ELBO trace."""

    loc: torch.Tensor  # [B, d]
    scale: torch.Tensor  # [B, d]
    elbo_history: list[float]  # mean ELBO over the batch, per step

    def distribution(self) -> Independent:
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1)


def local_elbo(model, batch: Batch, q, mc_samples: int) -> torch.Tensor:
    """ELBO per example ``[B]`` of an arbitrary q(z) (batch [B]) under the model's decoder and prior."""
    z = q.rsample((mc_samples,))  # [L, B, d]
    recon = model.decode(z, batch).log_prob(batch.x).mean(0)  # [B]
    return recon - kl_term(q, model.prior(batch), z)


def fit_local_posterior(model, batch, *, steps: int = 500, lr: float = 0.05, mc_samples: int = 8,
                        init: str = "encoder", seed: int = 0) -> LocalPosterior:
    """Maximise each example's ELBO over its own Gaussian q(z) (Adam on loc and log scale, the learning rate
    decaying linearly to lr/20; model weights fixed).

    ``init="encoder"`` starts from the model's q(z|x) (its diagonal), ``"prior"`` from N(0, I).
    """
    if steps < 1 or lr <= 0 or mc_samples < 1:
        raise ElbolabError(f"expected steps >= 1, lr > 0, mc_samples >= 1; got {steps}, {lr}, {mc_samples}")
    batch = as_batch(batch)
    param = next(model.parameters())
    batch = batch.to(param)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if init == "encoder":
            q0 = model.encode(batch)
            try:
                loc0, scale0 = q0.mean, q0.variance.sqrt()
            except NotImplementedError:  # a flow posterior has no closed-form moments: match them by sampling
                draws = q0.sample((1024,))  # [1024, B, d]
                loc0, scale0 = draws.mean(0), draws.std(0)
        elif init == "prior":
            loc0 = torch.zeros(len(batch), model.config.latent_dim, dtype=param.dtype, device=param.device)
            scale0 = torch.ones_like(loc0)
        else:
            raise ElbolabError(f"expected init 'encoder' or 'prior', got {init!r}")
    loc = loc0.clone().requires_grad_(True)  # [B, d]
    log_scale = scale0.log().clone().requires_grad_(True)  # [B, d]
    optimizer = torch.optim.Adam([loc, log_scale], lr=lr)
    # a linear decay to lr/20 lets the Monte-Carlo noise of the last steps average out
    decay = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.05, total_iters=steps)
    history = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(steps):
                q = Independent(Normal(loc, log_scale.exp(), validate_args=False), 1)
                elbo = local_elbo(model, batch, q, mc_samples)  # [B]
                optimizer.zero_grad(set_to_none=True)
                (-elbo.sum()).backward()  # each example's parameters get only its own gradient
                optimizer.step()
                decay.step()
                history.append(float(elbo.detach().mean()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return LocalPosterior(loc.detach(), log_scale.detach().exp(), history)


def _check_proposal(proposal: Distribution, n: int, what: str) -> None:
    if len(proposal.batch_shape) != 1 or proposal.batch_shape[0] != n or len(proposal.event_shape) != 1:
        raise ElbolabError(
            f"{what}: expected a proposal with batch shape [{n}] (one per example) and event shape [d], got batch "
            f"{list(proposal.batch_shape)} and event {list(proposal.event_shape)}; build it for these {n} examples, "
            f"e.g. Independent(Normal(loc, scale), 1) with loc [{n}, d] (LocalPosterior.distribution())"
        )


@torch.no_grad()
def importance_sampled_log_px_from(model, batch, proposal: Distribution, *, k: int = 1000,
                                   chunk_size: int | None = None) -> LogLikelihoodEstimate:
    """log p(x) ~= log 1/K sum_k p(x | z_k) p(z_k) / r(z_k),  z_k ~ r,  per example, for a given proposal r(z)
    with batch shape [B] (one per example of ``batch``) and event shape [d]: e.g. a fitted
    ``LocalPosterior.distribution()``. The model needs only ``decode(z, batch)`` and ``prior(batch)``.

    A stochastic lower bound for any r that covers the posterior (E[log p^] <= log p(x), Jensen), tight when r is
    the exact posterior. The Monte-Carlo s.e. and bias estimate are the delta-method ones of
    ``estimators.summarize_log_px`` (from Kish's ESS; optimistic when the weights are heavy-tailed). All B examples
    go through the decoder together, in chunks of ``chunk_size`` draws (planned from ``estimators.BLOCK_BYTES``
    when None): pass a batch of a size that fits.
    """
    batch = check_inputs(model, batch, k, None, chunk_size).to(model_tensor(model))
    _check_proposal(proposal, len(batch), "importance_sampled_log_px_from")

    def log_weights(part: Batch, k_chunk: int) -> torch.Tensor:
        z = proposal.sample((k_chunk,))  # [k_chunk, B, d]
        log_joint = model.decode(z, part).log_prob(part.x) + model.prior(part).log_prob(z)  # [k_chunk, B]
        return log_joint - proposal.log_prob(z)  # [k_chunk, B]

    log_mean, ess = chunked_log_mean_exp(model, batch, log_weights, k=k, batch_size=len(batch), chunk_size=chunk_size,
                                         progress=False, desc="log p(x) (IS from a given proposal)")
    return dataclasses.replace(summarize_log_px(log_mean, ess, k), ess=ess)


@torch.no_grad()
def elbo_with_variance(model, batch, q: Distribution, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Monte-Carlo ELBO of q(z) (batch [B]) per example and the Monte-Carlo variance of that estimate, ``[B]``
    float64 each, from ``samples`` draws (in chunks, so that 1000s of draws fit in memory).

    The KL is in closed form when torch knows the pair (the variance is then the reconstruction term's alone),
    else per draw log q(z_l) - log p(z_l), as ``local_elbo`` does."""
    if samples < 2:
        raise ElbolabError(f"expected samples >= 2 for a Monte-Carlo variance, got {samples}")
    batch = as_batch(batch).to(model_tensor(model))
    _check_proposal(q, len(batch), "elbo_with_variance")
    prior = model.prior(batch)
    try:
        kl = kl_divergence(q, prior).double()  # [B]
    except NotImplementedError:
        kl = None
    _, chunk = plan_chunks(len(batch), samples, sample_width(model), batch_size=len(batch))
    total = torch.zeros(len(batch), dtype=torch.float64)  # running sum over draws, [B]
    total_sq = torch.zeros(len(batch), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for done in range(0, samples, chunk):
            z = q.sample((min(chunk, samples - done),))  # [c, B, d]
            term = model.decode(z, batch).log_prob(batch.x)  # [c, B]
            if kl is None:
                term = term - (q.log_prob(z) - prior.log_prob(z))
            term = term.to(device="cpu", dtype=torch.float64)
            total += term.sum(0)
            total_sq += term.pow(2).sum(0)
    finally:
        model.train(was_training)
    mean = total / samples  # [B]
    variance = ((total_sq - samples * mean.pow(2)) / (samples - 1)).clamp_min(0.0) / samples  # [B], of the mean
    return (mean if kl is None else mean - kl.cpu()), variance


def _summary(values: torch.Tensor, variances: torch.Tensor) -> tuple[float, float, float]:
    """Mean over the examples, its Monte-Carlo s.e. sqrt(sum_i var_i) / N, and its s.e. over examples sd / sqrt(N)."""
    n = len(values)
    over_examples = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
    return float(values.mean()), float(variances.sum().sqrt() / n), over_examples


@torch.no_grad()
def amortization_gap(model, batch, *, k: int = 1000, elbo_samples: int = 1000, proposal: str = "optimal",
                     ais: dict | None = None, **fit_options) -> dict:
    """Cremer et al. 2018's decomposition, averaged over the batch, in nats, with Monte-Carlo standard errors.

    Fits q* per example (``fit_local_posterior(model, batch, **fit_options)``), then estimates log p(x) by
    importance sampling with K = ``k`` draws of

    * ``proposal="optimal"`` (default): the fitted q*, Cremer et al.'s IWAE with the locally optimised q;
    * ``"amortized"``: the encoder's q_phi(z|x) (the estimate of earlier versions; biased low when q_phi is poor,
      which shrinks the approximation gap, possibly below zero, and with it the total);
    * ``"both"``: both, keeping the larger estimate per example;

    and, with ``ais`` (a dict of ``elbolab.ais.ais_log_px`` options, e.g. ``{"steps": 500, "chains": 16}``), also
    AIS, again keeping the largest estimate per example. Each candidate is a stochastic lower bound of log p(x);
    their maximum is the best available estimate, but it is NOT a lower bound in expectation: when two candidates
    are about equally good, taking the larger selects upward noise (a bias of the order of their Monte-Carlo s.e.).
    The reported s.e. of the maximum is that of the chosen candidate, per example (it ignores the selection).

    The ELBOs are Monte-Carlo estimates with ``elbo_samples`` draws (closed-form KL when torch has it). q* comes
    from a stochastic optimisation: if it stops short of the best member of the family, ELBO(q*) is too low, so
    the approximation gap is overestimated and the amortisation gap underestimated by the same amount; the
    Monte-Carlo s.e. does not include this error (compare ``elbo_history``, or refit with more steps).

    Returns floats ``log_px``, ``elbo_amortized``, ``elbo_optimal``, ``approximation_gap``, ``amortization_gap``
    (means over the examples), each with ``_mc_stderr`` (Monte-Carlo s.e. of that mean for these examples) and
    ``_stderr_over_examples`` (sd / sqrt(N): how much another test set would move it); ``log_px_estimator`` (what
    log p(x) is, in words), ``log_px_candidates`` ({name: {"mean", "mc_stderr", "chosen"}}: each candidate's
    estimate and on how many examples it was the largest), ``k``, ``elbo_samples``, ``n_examples``,
    ``fit_final_elbo`` (mean ELBO at the last fitting step), and ``per_example`` ({name: [N] float64 tensor}).
    """
    if proposal not in PROPOSALS:
        raise ElbolabError(f"amortization_gap: expected proposal in {', '.join(PROPOSALS)}, got {proposal!r}; "
                           "'optimal' (the fitted q*) is the better estimate of log p(x)")
    if ais is not None and (not isinstance(ais, dict) or "steps" not in ais):
        raise ElbolabError(f"amortization_gap: expected ais as a dict of elbolab.ais.ais_log_px options with 'steps' "
                           f"(e.g. {{'steps': 500, 'chains': 16}}), got {ais!r}")
    batch = as_batch(batch).to(model_tensor(model))
    with torch.enable_grad():
        local = fit_local_posterior(model, batch, **fit_options)
    was_training = model.training
    model.eval()
    try:
        q_phi, q_star = model.encode(batch), local.distribution()  # batch [B], event [d] each
        candidates = {}  # name -> (log p^(x) [B], its Monte-Carlo variance [B]), float64
        for name, r in (("optimal", q_star), ("amortized", q_phi)):
            if proposal in (name, "both"):
                estimate = importance_sampled_log_px_from(model, batch, r, k=k)
                candidates[f"is_{name}"] = (estimate.per_example, (estimate.ess.reciprocal() - 1.0 / k).clamp_min(0))
        if ais is not None:

            with torch.enable_grad():  # HMC needs gradients of log p(x, z) in z
                run = ais_log_px(model, batch, **ais)
            candidates["ais"] = (run["log_px"].double(), run["stderr"].double().pow(2))
        names = list(candidates)
        values = torch.stack([candidates[n][0] for n in names])  # [C, B]
        variances = torch.stack([candidates[n][1] for n in names])  # [C, B]
        log_px, chosen = values.max(0)  # [B] each
        log_px_var = variances.gather(0, chosen.unsqueeze(0)).squeeze(0)  # [B]
        amortized, amortized_var = elbo_with_variance(model, batch, q_phi, elbo_samples)  # [B] each
        optimal, optimal_var = elbo_with_variance(model, batch, q_star, elbo_samples)  # [B] each
    finally:
        model.train(was_training)
    described = {"is_optimal": f"IS with the fitted q* (K = {k})", "is_amortized": f"IS with q_phi(z|x) (K = {k})",
                 "ais": f"AIS ({ais.get('steps') if ais else 0} steps, {(ais or {}).get('chains', 16)} chains)"}
    estimator = " and ".join(described[n] for n in names)
    if len(names) > 1:
        estimator = f"the larger per example of {estimator}"
    per_example = {"log_px": log_px, "elbo_amortized": amortized, "elbo_optimal": optimal,
                   "approximation_gap": log_px - optimal, "amortization_gap": optimal - amortized,
                   **{f"log_px_{n}": candidates[n][0] for n in names}}
    variance = {"log_px": log_px_var, "elbo_amortized": amortized_var, "elbo_optimal": optimal_var,
                "approximation_gap": log_px_var + optimal_var,  # independent draws: the variances add
                "amortization_gap": optimal_var + amortized_var}
    result = {}
    for key, var in variance.items():
        mean, mc_stderr, over_examples = _summary(per_example[key], var)
        result.update({key: mean, f"{key}_mc_stderr": mc_stderr, f"{key}_stderr_over_examples": over_examples})
    result.update({
        "log_px_estimator": estimator,
        "log_px_candidates": {n: {"mean": float(candidates[n][0].mean()),
                                  "mc_stderr": float(candidates[n][1].sum().sqrt() / len(batch)),
                                  "chosen": int((chosen == i).sum())} for i, n in enumerate(names)},
        "k": k, "elbo_samples": elbo_samples, "n_examples": len(batch),
        "fit_final_elbo": local.elbo_history[-1],
        "per_example": per_example,
    })
    return result
