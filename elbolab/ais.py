"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC) for log p(x) of a latent-variable model.

AIS (Neal 2001, "Annealed importance sampling", Statistics and Computing 11:125-139), used for decoder-based
models as in Wu, Burda, Salakhutdinov & Grosse 2017 ("On the quantitative analysis of decoder-based generative
models", ICLR). An initial density p0(z) -- the prior p(z), or the encoder's q(z|x) -- is joined to the
unnormalised posterior p(x, z) = p(z) p(x|z) by the geometric path

    f_t(z) = p0(z)^(1 - beta_t) p(x, z)^beta_t,       0 = beta_0 < beta_1 < ... < beta_T = 1,   T = steps,

whose normalisers are Z_0 = 1 and Z_T = p(x). A chain draws z_0 ~ p0 and, for t = 1..T, adds

    log w += log f_t(z_{t-1}) - log f_{t-1}(z_{t-1}) = (beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log p0(z_{t-1})]

before moving z_{t-1} -> z_t with an MCMC transition T_t that leaves f_t invariant. w is an importance weight on
the space of whole chains (Neal 2001), so E[w] = Z_T / Z_0 = p(x) exactly, for any T. With C chains

    log p^(x) = log 1/C sum_c w_c,        E[log p^(x)] <= log p(x)      (Jensen: a stochastic lower bound),

and its Monte-Carlo standard error across chains is the delta-method sd(w) / (sqrt(C) mean(w)), i.e.
sqrt((C / ESS - 1) / (C - 1)) with Kish's ESS = (sum w)^2 / sum w^2.

Reverse AIS and BDMC (Grosse, Ghahramani & Adams 2015, "Sandwiching the marginal likelihood using bidirectional
Monte Carlo", arXiv:1511.02543; Wu et al. 2017). For data simulated from the model, (z, x) ~ p(z) p(x|z),
z is an exact sample of p(z|x) = f_T / Z_T. Running the same path backwards from it,

    log w_rev += log f_{t-1}(z_t) - log f_t(z_t),   t = T, ..., 1,   with T_{t-1} applied between the terms,

gives E[w_rev] = Z_0 / Z_T = 1 / p(x), so  -log 1/C sum_c w_rev,c  is a stochastic upper bound. In expectation
the gap between the two bounds bounds the error of either estimate on such data; it shrinks to 0 as T grows.
(The forward run ends with a transition at beta = 1, so its final states are approximate posterior samples; the
reverse run needs none at beta = 0.)

Annealing schedule: sigmoid by default (as Grosse et al. 2015 and Wu et al. 2017), beta_t proportional to
sigmoid(4 (2t/T - 1)) rescaled to [0, 1]. The log-weight increment of step t has variance about
(beta_t - beta_{t-1})^2 Var_{f_t}[log p(x|z) - log p0(z)/p(z)], and that variance is largest at the start of the
path (under the prior the likelihood of D pixels varies by hundreds of nats; once it dominates, its variance falls
like 1/beta^2). The sigmoid's first (and last) steps are ~7x smaller than a linear schedule's; on a linear-Gaussian
model (d = 5, D = 20) it cut the per-chain gap log p(x) - E[log w] from 7.9 to 2.9 nats at 100 steps and from
0.89 to 0.24 at 1000. ``schedule="linear"`` is available for comparison.

Transitions: Hamiltonian Monte Carlo (Neal 2011, "MCMC using Hamiltonian dynamics") with ``leapfrog_steps``
leapfrog steps, unit mass, a Metropolis accept/reject per chain, gradients of log f_t by torch.autograd (all
else under no_grad). The step size is per example, the same for all chains of that example, and is adapted
towards an acceptance rate of 0.65 (Wu et al. 2017) by  log eps <- log eps + 0.5 (a - 0.65),  a = the mean
acceptance probability of the previous transition; each chain's step is further jittered by +-20% (see
``hmc_transition``). AIS stays exactly valid only if the transitions do not depend
on the chains being weighted (a kernel tuned on a chain's own past makes its weight biased, however slightly), so
``a`` comes from ``tune_chains`` extra pilot chains per example that run alongside and are never weighted; given
the pilots, the weighted chains see a fixed sequence of HMC kernels. Reverse AIS reuses the forward run's step
sizes in reverse order (its chains all start at the one posterior sample, so pilots started there would not be
independent of it); BDMC thus sandwiches log p(x) with the same kernels in both directions.

All chains run in parallel as one tensor [K, B, d] (K = weighted chains + pilots, B examples, d latent dims).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from elbolab.data.core import Batch, as_batch, check_seed
from elbolab.errors import ElbolabError
from elbolab.objectives import effective_sample_size, iwae_bound

INITIALS = ("prior", "posterior")
SCHEDULES = ("sigmoid", "linear")
SIGMOID_RADIUS = 4.0  # beta ~ sigmoid(r (2t/T - 1)): r = 4 as in Grosse et al. 2015
TARGET_ACCEPTANCE = 0.65  # Wu et al. 2017
ADAPT_RATE = 0.5  # log eps moves by ADAPT_RATE * (acceptance - target) per transition
STEP_SIZE_RANGE = (1e-3, 1e2)  # the adapted step size stays within these multiples of the initial one
STEP_JITTER = 0.2  # each chain's step size is drawn uniformly within +-20% of the adapted one, at every transition


# ---------------------------------------------------------------------------------------------- schedule


def annealing_schedule(steps: int, kind: str = "sigmoid") -> list[float]:
    """The T + 1 = ``steps`` + 1 inverse temperatures 0 = beta_0 < ... < beta_T = 1 (floats)."""
    _check_int("steps", steps, 1, "try --steps 1000 (Wu et al. 2017 use 1000 to 10000 on MNIST)")
    if kind not in SCHEDULES:
        raise ElbolabError(f"AIS: expected schedule in {list(SCHEDULES)}, got {kind!r}")
    t = torch.linspace(-1.0, 1.0, steps + 1, dtype=torch.float64)  # [T + 1]
    if kind == "linear":
        betas = (t + 1) / 2
    else:
        s = torch.sigmoid(SIGMOID_RADIUS * t)
        betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return [float(b) for b in betas]


# ---------------------------------------------------------------------------------------------- HMC


def hmc_transition(z: torch.Tensor, log_f: torch.Tensor, grad: torch.Tensor, evaluate, step_size: torch.Tensor,
                   leapfrog_steps: int, extra: tuple = (), jitter: float = STEP_JITTER):
    """One HMC transition of every chain, leaving the density f invariant.

    ``z`` [K, B, d] current states; ``log_f`` [K, B] and ``grad`` [K, B, d] log f and its gradient there;
    ``evaluate(z) -> (log_f, grad, extra)`` the same at new states (``extra``: tensors [K, B, ...] kept with the
    state, e.g. the terms log f is made of); ``step_size`` broadcastable to [K, B, 1] (e.g. [B, 1] per example).

    Momentum p ~ N(0, I), H = -log f(z) + |p|^2 / 2, ``leapfrog_steps`` leapfrog steps, then z' is accepted with
    probability min(1, exp(H - H')). Each chain's step size is multiplied by a uniform draw from
    [1 - jitter, 1 + jitter], independent of the state (so each transition is a mixture of valid kernels): a fixed
    step size can make the trajectory nearly periodic, e.g. a near-reflection about the mean of a Gaussian, which
    then barely mixes (Neal 2011 recommends randomising the step size for this reason). A trajectory that leaves
    the finite numbers is rejected (it is never evaluated beyond that point).
    Returns (z, log_f, grad, extra, accept_prob [K, B]).
    """
    z0 = z
    if jitter:
        scale = 1 + jitter * (2 * torch.rand(log_f.shape, dtype=z.dtype, device=z.device) - 1)  # [K, B]
        step_size = step_size * scale.unsqueeze(-1)  # [K, B, 1]
    p = torch.randn_like(z)  # [K, B, d]
    h0 = -log_f + 0.5 * p.pow(2).sum(-1)  # [K, B]
    diverged = torch.zeros(log_f.shape, dtype=torch.bool, device=z.device)  # [K, B]
    new_log_f, new_grad, new_extra = log_f, grad, extra
    p = p + 0.5 * step_size * grad  # half step of momentum
    for step in range(leapfrog_steps):
        z = z + step_size * p  # full step of position
        diverged = diverged | ~torch.isfinite(z).all(-1)
        z = torch.where(diverged.unsqueeze(-1), z0, z)  # a diverged chain is parked at its start (and rejected)
        new_log_f, new_grad, new_extra = evaluate(z)
        diverged = diverged | ~torch.isfinite(new_log_f) | ~torch.isfinite(new_grad).all(-1)
        p = p + (step_size if step < leapfrog_steps - 1 else 0.5 * step_size) * new_grad
    h1 = -new_log_f + 0.5 * p.pow(2).sum(-1)  # [K, B]
    log_accept = (h0 - h1).clamp(max=0.0)
    log_accept = torch.where(diverged | torch.isnan(log_accept), torch.full_like(log_accept, -math.inf), log_accept)
    accept = torch.rand_like(log_accept).log() < log_accept  # [K, B]

    def keep(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(accept.view(accept.shape + (1,) * (new.dim() - accept.dim())), new, old)

    extra = tuple(keep(n, o) for n, o in zip(new_extra, extra))
    return keep(z, z0), keep(new_log_f, log_f), keep(new_grad, grad), extra, log_accept.exp()


# ---------------------------------------------------------------------------------------------- the path


class _Path:
    """log p0(z) and log p(x, z) of one batch, with their gradients in z: the two ends of the geometric path."""

    def __init__(self, model, batch: Batch, initial: str):
        self.model, self.batch, self.initial = model, batch, initial
        self.prior = model.prior(batch)  # batch [] or [B], event [d]
        if len(self.prior.event_shape) != 1:
            raise ElbolabError(f"AIS: expected a prior with event shape [d], got {tuple(self.prior.event_shape)}")
        self.q = model.encode(batch) if initial == "posterior" else None  # batch [B], event [d]
        self.size = len(batch)
        self.dim = self.prior.event_shape[0]

    def sample_initial(self, k: int) -> torch.Tensor:
        """k draws from p0 per example, [k, B, d]."""
        start = self.q if self.q is not None else self.prior
        shape = (k,) if len(start.batch_shape) else (k, self.size)
        z = start.sample(shape)
        if z.shape != (k, self.size, self.dim):
            raise ElbolabError(f"AIS: expected {self.initial} samples of shape {(k, self.size, self.dim)}, got "
                               f"{tuple(z.shape)}; the {self.initial} needs batch shape [] or [B={self.size}]")
        return z

    def terms(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(log p0, log p(x, z), d log p0 / dz, d log p(x, z) / dz) at z [K, B, d]: [K, B] twice, [K, B, d] twice.

        Each density term is evaluated on its own copy of z, so one backward pass yields every gradient."""
        with torch.enable_grad():
            names = ("prior", "likelihood") + (("q",) if self.q is not None else ())
            leaves = {name: z.detach().requires_grad_(True) for name in names}
            values = {
                "prior": self.prior.log_prob(leaves["prior"]),  # [K, B]
                "likelihood": self.model.decode(leaves["likelihood"], self.batch).log_prob(self.batch.x),  # [K, B]
            }
            if self.q is not None:
                values["q"] = self.q.log_prob(leaves["q"])  # [K, B]
            for name, value in values.items():
                if value.shape != z.shape[:-1]:
                    raise ElbolabError(f"AIS: expected log {name} of shape {tuple(z.shape[:-1])} for z of shape "
                                       f"{tuple(z.shape)}, got {tuple(value.shape)}")
            total = sum(v.sum() for v in values.values())
            grads = (torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
                     if total.requires_grad else [None] * len(names))
        grad = {n: torch.zeros_like(z) if g is None else g for n, g in zip(names, grads)}  # [K, B, d] each
        values = {n: v.detach() for n, v in values.items()}
        log_joint = values["prior"] + values["likelihood"]  # [K, B]
        grad_joint = grad["prior"] + grad["likelihood"]  # [K, B, d]
        start = "q" if self.q is not None else "prior"
        return values[start], log_joint, grad[start], grad_joint


def _at(terms: tuple[torch.Tensor, ...], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log f_beta = (1 - beta) log p0 + beta log p(x, z) and its gradient, from ``_Path.terms``."""
    log_p0, log_joint, grad_p0, grad_joint = terms
    return (1 - beta) * log_p0 + beta * log_joint, (1 - beta) * grad_p0 + beta * grad_joint


def _anneal(path: _Path, z: torch.Tensor, betas: list[float], *, chains: int, leapfrog_steps: int,
            step_size: float, step_sizes: torch.Tensor | None, final_transition: bool, tick) -> dict:
    """Move the chains z [K, B, d] along ``betas`` (increasing: forward AIS; decreasing: reverse AIS).

    The first ``chains`` chains are weighted; any further ones are pilots whose acceptance adapts the step size
    (when ``step_sizes``, [transitions, B], is not given). Returns the log weights [chains, B] (float64), the
    states, the step sizes used [transitions, B] and the weighted chains' mean acceptance probability."""
    n_examples = z.shape[1]
    adapt = step_sizes is None and z.shape[0] > chains
    eps = torch.full((n_examples,), float(step_size), dtype=torch.float64, device=z.device)  # [B]
    low, high = math.log(step_size * STEP_SIZE_RANGE[0]), math.log(step_size * STEP_SIZE_RANGE[1])
    terms = path.terms(z)
    log_w = torch.zeros(chains, n_examples, dtype=torch.float64, device=z.device)  # [C, B]
    used, acceptance = [], []
    for t in range(1, len(betas)):
        log_p0, log_joint = terms[0], terms[1]
        log_w += (betas[t] - betas[t - 1]) * (log_joint[:chains].double() - log_p0[:chains].double())  # [C, B]
        if t < len(betas) - 1 or final_transition:
            if step_sizes is not None:
                eps = step_sizes[len(used)]
            used.append(eps)
            beta = betas[t]

            def evaluate(z_new: torch.Tensor, beta: float = beta):
                new_terms = path.terms(z_new)
                return (*_at(new_terms, beta), new_terms)

            log_f, grad = _at(terms, beta)
            step = eps.to(z.dtype).unsqueeze(-1)  # [B, 1]
            z, _, _, terms, accept = hmc_transition(z, log_f, grad, evaluate, step, leapfrog_steps, terms)
            acceptance.append(accept[:chains].double().mean())
            if adapt:  # from the pilots' acceptance in this transition: used from the next transition on
                pilots = accept[chains:].double().mean(0)  # [B]
                eps = (eps.log() + ADAPT_RATE * (pilots - TARGET_ACCEPTANCE)).clamp(low, high).exp()
        tick()
    return {
        "log_w": log_w,
        "z": z,
        "step_sizes": torch.stack(used) if used else eps.new_zeros(0, n_examples),
        "acceptance": float(torch.stack(acceptance).mean()) if acceptance else float("nan"),
    }


# ---------------------------------------------------------------------------------------------- estimates


def _estimate(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[C, B] log weights -> log 1/C sum_c w_c, its delta-method s.e. across chains, Kish's ESS; [B] each."""
    chains = log_w.shape[0]
    log_px = iwae_bound(log_w)  # [B]
    ess = effective_sample_size(log_w)  # [B]
    if chains < 2:
        return log_px, torch.full_like(log_px, math.nan), ess
    return log_px, ((chains / ess - 1).clamp_min(0) / (chains - 1)).sqrt(), ess


def _check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ElbolabError(f"AIS: expected {name} as an integer >= {minimum}, got {value!r}; {hint}")
    return int(value)


def _check(model, *, steps, chains, leapfrog_steps, step_size, initial, schedule, tune_chains, seed, progress):
    _check_int("steps", steps, 1, "try steps=1000 (Wu et al. 2017 use 1000 to 10000 on MNIST)")
    _check_int("chains", chains, 1, "try chains=16")
    _check_int("leapfrog_steps", leapfrog_steps, 1, "try leapfrog_steps=10")
    _check_int("tune_chains", tune_chains, 0, "try tune_chains=4 (0 keeps the step size fixed)")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size < math.inf:
        raise ElbolabError(f"AIS: expected step_size as a positive number, got {step_size!r}; try step_size=0.05")
    if initial not in INITIALS:
        raise ElbolabError(f"AIS: expected initial in {list(INITIALS)}, got {initial!r}")
    if schedule not in SCHEDULES:
        raise ElbolabError(f"AIS: expected schedule in {list(SCHEDULES)}, got {schedule!r}")
    check_seed(seed)
    if progress is not None and not callable(progress):
        raise ElbolabError(f"AIS: expected progress as a callable (done, total) or None, got {type(progress).__name__}")
    needs = ("prior", "decode") + (("encode",) if initial == "posterior" else ())
    missing = [name for name in needs if not callable(getattr(model, name, None))]
    if missing:
        raise ElbolabError(f"AIS: expected a model with methods {list(needs)}, got {type(model).__name__} without "
                           f"{missing}" + ("; try initial='prior'" if missing == ["encode"] else ""))


def _model_tensor(model) -> torch.Tensor | None:
    parameters = getattr(model, "parameters", None)
    tensor = next(iter(parameters()), None) if callable(parameters) else None
    return tensor if tensor is not None and tensor.is_floating_point() else None


class _Evaluation:
    """The model in eval mode (no dropout), the global RNG seeded and restored, gradients off."""

    def __init__(self, model, seed: int, like: torch.Tensor | None):
        self.model, self.seed = model, seed
        self.training = getattr(model, "training", None)
        cuda = like is not None and like.device.type == "cuda"
        self.fork = torch.random.fork_rng(devices=[like.device] if cuda else [])
        self.no_grad = torch.no_grad()

    def __enter__(self):
        if isinstance(self.training, bool) and callable(getattr(self.model, "train", None)):
            self.model.train(False)
        self.fork.__enter__()
        torch.manual_seed(self.seed)
        self.no_grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.fork.__exit__(*exc)
        if isinstance(self.training, bool) and callable(getattr(self.model, "train", None)):
            self.model.train(self.training)
        return False


def _ticker(progress, total: int, done: int = 0):
    state = {"done": done}

    def tick():
        state["done"] += 1
        if progress is not None:
            progress(state["done"], total)

    return tick


def ais_log_px(model, batch, *, steps: int, chains: int = 16, leapfrog_steps: int = 10, step_size: float = 0.05,
               initial: str = "prior", schedule: str = "sigmoid", tune_chains: int = 4, seed: int = 0,
               progress=None) -> dict:
    """AIS estimate of log p(x) per example (see the module docstring).

    ``model`` offers ``prior(batch)``, ``decode(z, batch)`` (and ``encode(batch)`` for ``initial="posterior"``,
    which starts the chains from q(z|x) instead of the prior); ``batch`` is a Batch or a tensor [B, D].
    ``steps`` = T annealing steps, each one HMC transition of ``leapfrog_steps`` leapfrog steps; ``chains`` = C
    weighted chains per example; ``tune_chains`` pilot chains per example adapt the step size (starting at
    ``step_size``; 0 keeps it fixed). ``progress(done, total)`` is called after every step.

    Returns a dict: ``log_px`` [B] (float64, log 1/C sum_c w_c), ``stderr`` [B] (its Monte-Carlo s.e. across
    chains; NaN for C = 1), ``ess`` [B], ``log_w`` [C, B], ``acceptance`` (mean acceptance probability of the
    weighted chains), ``z`` [C, B, d] (final states: approximate posterior samples), ``step_sizes`` [T, B],
    ``betas`` [T + 1], ``mean`` and ``mean_stderr`` (over the examples).
    """
    _check(model, steps=steps, chains=chains, leapfrog_steps=leapfrog_steps, step_size=step_size, initial=initial,
           schedule=schedule, tune_chains=tune_chains, seed=seed, progress=progress)
    batch = as_batch(batch)
    if len(batch) < 1:
        raise ElbolabError("AIS: expected a batch of at least one example, got 0 rows")
    like = _model_tensor(model)
    if like is not None:
        batch = batch.to(like)
    betas = annealing_schedule(steps, schedule)
    with _Evaluation(model, seed, like):
        path = _Path(model, batch, initial)
        z = path.sample_initial(chains + tune_chains)  # [C + P, B, d]
        run = _anneal(path, z, betas, chains=chains, leapfrog_steps=leapfrog_steps, step_size=step_size,
                      step_sizes=None, final_transition=True, tick=_ticker(progress, steps))
    log_px, stderr, ess = _estimate(run["log_w"].cpu())
    return {
        "log_px": log_px,
        "stderr": stderr,
        "ess": ess,
        "log_w": run["log_w"].cpu(),
        "acceptance": run["acceptance"],
        "z": run["z"][:chains],
        "step_sizes": run["step_sizes"].cpu(),
        "betas": torch.tensor(betas, dtype=torch.float64),
        "mean": float(log_px.mean()),
        "mean_stderr": float(stderr.pow(2).sum().sqrt() / len(log_px)),
    }


def bdmc(model, n_examples: int, *, steps: int, chains: int = 16, leapfrog_steps: int = 10, step_size: float = 0.05,
         initial: str = "prior", schedule: str = "sigmoid", tune_chains: int = 4, batch=None, seed: int = 0,
         progress=None) -> dict:
    """Bidirectional Monte Carlo on data simulated from the model: log p(x) sandwiched between forward AIS (a
    stochastic lower bound) and reverse AIS from the exact posterior sample (a stochastic upper bound).

    Draws z ~ p(z), x ~ p(x|z) (``decode(z).sample()``: binary data for a Bernoulli decoder) for ``n_examples``
    examples; ``batch`` (optional) supplies what a conditional model conditions on (labels, masks): its first
    ``n_examples`` rows, with x replaced by the simulated data. The forward run adapts the step sizes with pilot
    chains; the reverse run uses the same step sizes, in reverse order. ``progress(done, total)`` is called after
    each of the 2 * ``steps`` steps. Other arguments as in ``ais_log_px``.

    Returns a dict: ``lower`` and ``upper`` [N] (float64), ``lower_stderr`` and ``upper_stderr`` [N],
    ``lower_mean``, ``upper_mean``, ``gap`` (= upper_mean - lower_mean), ``x`` [N, D], ``z`` [N, d] (the exact
    posterior samples), ``acceptance_forward``, ``acceptance_reverse``, ``step_sizes`` [T, N].
    """
    _check(model, steps=steps, chains=chains, leapfrog_steps=leapfrog_steps, step_size=step_size, initial=initial,
           schedule=schedule, tune_chains=tune_chains, seed=seed, progress=progress)
    n = _check_int("n_examples", n_examples, 1, "try n_examples=100")
    like = _model_tensor(model)
    if batch is None:
        dtype, device = (like.dtype, like.device) if like is not None else (torch.get_default_dtype(), None)
        condition = Batch(torch.zeros(n, 0, dtype=dtype, device=device))  # no data: only the row count
    else:
        condition = as_batch(batch)
        if len(condition) < n:
            raise ElbolabError(f"BDMC: expected a batch of at least n_examples={n} rows to condition on, got "
                               f"{len(condition)}; pass fewer examples or a larger batch")
        condition = condition[:n]
        if like is not None:
            condition = condition.to(like)
    betas = annealing_schedule(steps, schedule)
    with _Evaluation(model, seed, like):
        prior = model.prior(condition)
        z_true = prior.sample((n,) if len(prior.batch_shape) == 0 else ())  # [N, d]
        try:
            x = model.decode(z_true, condition).sample()  # [N, D]
        except NotImplementedError:
            raise ElbolabError(f"BDMC: the decoder's distribution ({type(model.decode(z_true, condition)).__name__})"
                               " cannot be sampled, so data cannot be simulated from this model; use ais_log_px on "
                               "real data instead") from None
        data = Batch(x, condition.y, condition.index, condition.observed)
        path = _Path(model, data, initial)
        if z_true.shape != (n, path.dim):
            raise ElbolabError(f"BDMC: expected prior samples of shape {(n, path.dim)}, got {tuple(z_true.shape)}")
        tick = _ticker(progress, 2 * steps)
        forward = _anneal(path, path.sample_initial(chains + tune_chains), betas, chains=chains,
                          leapfrog_steps=leapfrog_steps, step_size=step_size, step_sizes=None, final_transition=True,
                          tick=tick)
        start = z_true.unsqueeze(0).expand(chains, n, path.dim).clone()  # [C, N, d]: every chain at the exact sample
        reverse = _anneal(path, start, betas[::-1], chains=chains, leapfrog_steps=leapfrog_steps, step_size=step_size,
                          step_sizes=forward["step_sizes"][:-1].flip(0), final_transition=False, tick=tick)
    lower, lower_stderr, _ = _estimate(forward["log_w"].cpu())
    neg_upper, upper_stderr, _ = _estimate(reverse["log_w"].cpu())
    upper = -neg_upper
    return {
        "lower": lower,
        "upper": upper,
        "lower_stderr": lower_stderr,
        "upper_stderr": upper_stderr,
        "lower_mean": float(lower.mean()),
        "upper_mean": float(upper.mean()),
        "gap": float(upper.mean() - lower.mean()),
        "x": x,
        "z": z_true,
        "acceptance_forward": forward["acceptance"],
        "acceptance_reverse": reverse["acceptance"],
        "step_sizes": forward["step_sizes"].cpu(),
    }
