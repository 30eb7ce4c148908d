"""Binary image denoising with an Ising prior: mean-field VI, ICM and Gibbs sampling (notes 002 s3).

The model, stated once for every function in this module
--------------------------------------------------------
Hidden clean image ``z`` with ``z_i in {-1, +1}`` on an ``H x W`` grid, observed image ``x`` (real values).
The unnormalised log posterior is::

    log p~(z | x) = J * sum_{(i,j) in E} z_i z_j  +  sum_i l_i(z_i)

where ``E`` is the set of UNDIRECTED 4-neighbour edges, each counted ONCE (horizontal and vertical pairs; the
border has no wrap-around), and ``l_i(z) = log p(x_i | z)``:

* ``noise="gaussian"``: ``l_i(z) = -(x_i - z)^2 / (2 sigma^2)`` (the notes drop the Gaussian's normaliser; so do
  we, so ``log Z`` below is the normaliser of exactly this ``p~``);
* ``noise="flip"``: ``l_i(z) = log(1 - p)`` if ``z == x_i`` else ``log p`` (each pixel flipped with prob. ``p``).

Both are affine in ``z``: ``l_i(z) = c_i + h_i z`` with the *field* ``h_i = (l_i^+ - l_i^-) / 2`` and
``c_i = (l_i^+ + l_i^-) / 2``. Gaussian: ``h_i = x_i / sigma^2``. Flip: ``h_i = eta x_i`` with the evidence
strength ``eta = log((1 - p) / p) / 2``.

Notes 002 writes the prior energy as ``-sum_i sum_{j in nbr(i)} W_ij z_i z_j``, a double sum that visits each
edge twice, yet derives the update ``m_i = sum_{j in nbr(i)} W_ij mu_j``. That update is the exact mean-field
update of the single-counted energy with ``W_ij = J``, which is the reading used here, so

    m_i = J * sum_{j in nbr(i)} mu_j,     a_i = m_i + h_i,     mu_i <- (1 - lambda) mu_i + lambda tanh(a_i).

Bishop (PRML s8.3.3) uses ``E = h sum z_i - beta sum_{pairs} z_i z_j - eta sum z_i x_i`` with pairs counted once:
his ``beta`` is our ``J`` and his ``eta`` is our flip-noise ``eta``. His ``eta = 2.1`` (with ``h = 0``) therefore
means an assumed flip probability ``p = 1 / (1 + exp(2 eta)) = 0.0148`` (:func:`flip_prob_from_evidence`), while
the exact value for 10% flips is ``eta = log(9) / 2 = 1.10``.

The mean-field ELBO of ``q(z) = prod_i q_i(z_i)`` with means ``mu_i = E_q[z_i]`` is::

    ELBO(mu) = E_q[log p~(z | x)] + sum_i H(q_i)
             = J * sum_{(i,j) in E} mu_i mu_j + sum_i (c_i + h_i mu_i) + sum_i H_b((1 + mu_i) / 2)

with ``H_b`` the binary entropy in nats; ``ELBO <= log Z = log sum_z p~(z | x)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import xlogy
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning

from elbolab.errors import ElbolabError
from elbolab.progress import Progress

NOISE_MODELS = ("gaussian", "flip")


def evidence_from_flip_prob(flip_prob: float) -> float:
    """Bishop's ``eta`` for flip noise with probability ``p``: ``eta = log((1 - p) / p) / 2``."""
    return 0.5 * math.log((1.0 - flip_prob) / flip_prob)


def flip_prob_from_evidence(eta: float) -> float:
    """Inverse of :func:`evidence_from_flip_prob`: ``p = 1 / (1 + exp(2 eta))`` (Bishop's 2.1 gives 0.0148)."""
    return 1.0 / (1.0 + math.exp(2.0 * eta))


def _check_real(name: str, value, low=None, high=None, low_open=True, high_open=True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ElbolabError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        interval = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, " \
                   f"{high if high is not None else 'inf'}{')' if high_open else ']'}"
        raise ElbolabError(f"{name} must be a finite number in {interval}, got {value!r}.")
    return value


def check_image(observed, noise: str = "gaussian", name: str = "observed image") -> np.ndarray:
    """Validate an observed image and return it as a float64 ``[H, W]`` array (ElbolabError otherwise)."""
    if isinstance(observed, torch.Tensor):
        observed = observed.detach().cpu().numpy()
    array = np.asarray(observed)
    if array.dtype.kind not in "iuf":
        raise ElbolabError(f"The {name} must be a real-valued array, got dtype {array.dtype}; "
                           "convert it with np.asarray(image, dtype=float).")
    if array.ndim != 2 or array.size == 0:
        raise ElbolabError(f"The {name} must be a non-empty 2-D array [H, W], got shape {array.shape}; "
                           "for a colour image pass one channel or its grey level.")
    array = np.asarray(array, dtype=np.float64)  # no copy when it is float64 already: never written to
    # one pass, no temporary: a finite sum means finite values (a NaN or inf makes the sum non-finite); only an
    # overflowing sum of finite values takes the exact check
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite sum is the signal, not a warning
        total = float(array.sum())
    if not math.isfinite(total) and not np.isfinite(array).all():
        raise ElbolabError(f"The {name} contains {int((~np.isfinite(array)).sum())} NaN/inf values; "
                           "replace them before denoising.")
    if noise == "flip" and not (np.abs(array) == 1.0).all():
        found = np.unique(array)[:5]
        raise ElbolabError(f"With noise='flip' the {name} must contain only -1 and +1, got values such as "
                           f"{found.tolist()}; map a 0/1 image with 2 * image - 1, or use noise='gaussian'.")
    return array


@dataclass(frozen=True)
class IsingModel:
    """The posterior ``p~(z | x)`` of the module docstring, evaluated in float64 NumPy (reference code path)."""

    coupling: float = 1.0
    noise: str = "gaussian"
    sigma: float = 1.0
    flip_prob: float = 0.1

    def __post_init__(self):
        _check_real("coupling", self.coupling)
        if self.noise not in NOISE_MODELS:
            raise ElbolabError(f"noise must be one of {NOISE_MODELS}, got {self.noise!r}.")
        _check_real("sigma", self.sigma, low=0.0)
        _check_real("flip_prob", self.flip_prob, low=0.0, high=0.5)

    def local_fields(self, observed) -> tuple[np.ndarray, np.ndarray]:
        """``(h, c)`` with ``l_i(z) = c_i + h_i z``; both ``[H, W]`` float64."""
        x = check_image(observed, self.noise)
        if self.noise == "gaussian":
            return x / self.sigma**2, -(x**2 + 1.0) / (2.0 * self.sigma**2)
        p = self.flip_prob
        return evidence_from_flip_prob(p) * x, np.full_like(x, 0.5 * (math.log1p(-p) + math.log(p)))

    def field_and_offset(self, x: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        """The field ``h`` as a tensor of ``dtype`` and ``sum_i c_i``, for an image :func:`check_image` accepted:
        :meth:`local_fields` without its two float64 images (the solvers' start-up cost on large images)."""
        xt = torch.from_numpy(x)
        if self.noise == "gaussian":
            squares = float(np.dot(x.ravel(), x.ravel()))  # sum x^2 without a temporary
            return xt.to(dtype, copy=True).div_(self.sigma**2), -(squares + x.size) / (2.0 * self.sigma**2)
        p = self.flip_prob
        return xt.to(dtype, copy=True).mul_(evidence_from_flip_prob(p)), x.size * 0.5 * (math.log1p(-p) + math.log(p))

    def log_joint(self, z, observed) -> float:
        """``log p~(z | x)`` for a configuration ``z`` (any real array; ``{-1, +1}`` for a state)."""
        h, c = self.local_fields(observed)
        z = np.asarray(z, dtype=np.float64)
        return float(self.coupling * _edge_sum(z) + (c + h * z).sum())

    def elbo(self, mu, observed) -> float:
        """Mean-field ELBO at means ``mu`` in ``[-1, 1]`` (module docstring)."""
        h, c = self.local_fields(observed)
        mu = np.asarray(mu, dtype=np.float64)
        if mu.shape != h.shape or np.abs(mu).max() > 1.0:
            raise ElbolabError(f"mu must have shape {h.shape} with values in [-1, 1], got shape {mu.shape}.")
        p_plus, p_minus = (1.0 + mu) / 2.0, (1.0 - mu) / 2.0
        entropy = -(xlogy(p_plus, p_plus) + xlogy(p_minus, p_minus)).sum()
        return float(self.coupling * _edge_sum(mu) + (c + h * mu).sum() + entropy)


def _edge_sum(a: np.ndarray) -> float:
    """``sum_{(i,j) in E} a_i a_j`` over the undirected 4-neighbour edges, each counted once."""
    return float((a[1:, :] * a[:-1, :]).sum() + (a[:, 1:] * a[:, :-1]).sum())


# ------------------------------------------------------------------------------------------------------------
# Vectorised torch kernels. A site's state lives in the interior of a zero-padded buffer P [..., H+2, W+2], so
# the neighbour sum is four shifted views added into a preallocated buffer (the cross-shaped 3x3 convolution
# written out; the benchmark times torch's one-channel conv2d too, which is slower on CPU). The zero border makes the
# missing neighbours of border pixels contribute nothing.


def neighbour_sum(padded: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum of the 4 neighbours of site (i, j)``; ``padded`` is ``[..., H+2, W+2]``."""
    torch.add(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], out=out)
    out.add_(padded[..., 1:-1, :-2])
    return out.add_(padded[..., 1:-1, 2:])


def checkerboard_masks(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[H, W]`` masks of the two colours; same-colour sites are never neighbours."""
    parity = (torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2
    return parity == 0, parity == 1


def padded_state(initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded buffer ``[..., H+2, W+2]`` and its interior view ``[..., H, W]`` holding ``initial``."""
    padded = torch.zeros(*initial.shape[:-2], initial.shape[-2] + 2, initial.shape[-1] + 2, dtype=initial.dtype)
    interior = padded[..., 1:-1, 1:-1]
    interior.copy_(initial)
    return padded, interior


class MeanFieldSweeper:
    """In-place damped mean-field sweeps on preallocated buffers (the fast path; see the benchmark).

    ``mu`` (a view into ``padded``) holds the means. ``sweep()`` runs one sweep, parallel (all sites from the old
    means: a Jacobi step) or checkerboard (colour 0 then colour 1, each from the freshest means: a block
    coordinate-ascent step that never decreases the ELBO), and returns the fixed-point residual
    ``max_i |tanh(a_i) - mu_i|`` seen during the sweep. With ``with_elbo=True`` it also returns the ELBO of the
    means it started from, computed from the neighbour sums the sweep needs anyway
    (``J sum_E mu_i mu_j + sum_i h_i mu_i = sum_i mu_i (a_i + h_i) / 2`` since ``a_i = J nbr_i + h_i``).
    ``offset`` is ``sum_i c_i``.
    """

    def __init__(self, mu0: torch.Tensor, field: torch.Tensor, coupling: float, damping: float,
                 schedule: str = "parallel", offset: float = 0.0):
        self.padded, self.mu = padded_state(mu0)
        self.field, self.coupling, self.damping, self.schedule = field, coupling, damping, schedule
        self.offset = offset
        self.work = torch.empty_like(mu0)  # [H, W]
        self.spare: list[torch.Tensor] = []  # three [H, W] buffers for the ELBO, allocated on first use
        if schedule == "checkerboard":
            self.colour_masks = [m.to(mu0.dtype) for m in checkerboard_masks(*mu0.shape)]

    def _field_into(self, out: torch.Tensor) -> torch.Tensor:
        a = neighbour_sum(self.padded, out)
        return torch.add(self.field, a, alpha=self.coupling, out=a)  # a_i = m_i + h_i

    def _elbo_from(self, a: torch.Tensor) -> float:
        """ELBO of the current ``mu`` given its ``a``; ``a`` is left unchanged."""
        if not self.spare:
            self.spare = [torch.empty_like(self.work) for _ in range(3)]
        one_plus, one_minus, scratch = self.spare
        energy = _sum(torch.add(a, self.field, out=scratch).mul_(self.mu)) / 2
        # Entropy of a +-1 spin with mean mu: log 2 - [(1+t) log(1+t) + (1-t) log(1-t)] / 2 with t = |mu|.
        # Clamping 1 - t away from 0 makes 0 * log 0 = 0 without xlogy (several times slower on CPU).
        torch.abs(self.mu, out=one_plus)
        torch.neg(one_plus, out=one_minus).add_(1.0)
        one_plus.add_(1.0)
        torch.log(one_plus, out=scratch).mul_(one_plus)
        torch.clamp(one_minus, min=1e-30, out=one_plus).log_().mul_(one_minus)
        entropy = self.mu.numel() * math.log(2.0) - _sum(scratch.add_(one_plus)) / 2
        return energy + entropy + self.offset

    def elbo(self) -> float:
        """ELBO of the current means."""
        return self._elbo_from(self._field_into(self.work))

    def sweep(self, with_elbo: bool = False):
        elbo = None
        if self.schedule == "parallel":
            a = self._field_into(self.work)
            if with_elbo:
                elbo = self._elbo_from(a)
            step = a.tanh_().sub_(self.mu)  # tanh(a_i) - mu_i
            residual = _max_abs(step)
            self.mu.add_(step, alpha=self.damping)
        else:
            residual = 0.0
            for colour, mask in enumerate(self.colour_masks):
                a = self._field_into(self.work)
                if with_elbo and colour == 0:
                    elbo = self._elbo_from(a)
                step = a.tanh_().sub_(self.mu).mul_(mask)
                residual = max(residual, _max_abs(step))
                self.mu.add_(step, alpha=self.damping)
        return (residual, elbo) if with_elbo else residual


# ------------------------------------------------------------------------------------------------------------
# The fused sweep. Eager torch runs each step above as its own pass over [H, W] (the ELBO alone is ~10 passes);
# compiled by torch.compile (inductor, C++ backend on CPU) the whole half-sweep becomes one loop nest that reads
# the means and the field once, writes the new means into a second zero-bordered buffer (double buffering: a
# parallel sweep must not read means it has already overwritten) and reduces, row by row, the residual and the
# two ELBO sums. Row-wise reductions keep inductor from splitting the loop in two. Same arithmetic as the eager
# sweeper, so the two agree to float rounding (tests/test_ising.py checks it).


def fused_half_sweep(src: torch.Tensor, dst: torch.Tensor, field: torch.Tensor, coupling: torch.Tensor,
                     damping: torch.Tensor, mask: torch.Tensor | None, with_elbo: bool):
    """Read the means from ``src`` [H+2, W+2], write the updated ones into ``dst``'s interior.

    ``mask`` [H, W] (bool) limits the update to one colour (None: every site). Returns the residual
    ``max |tanh(a) - mu|`` over the updated sites and, with ``with_elbo``, the energy
    ``sum mu (a + h) / 2`` and ``sum (1 + t) log(1 + t) + (1 - t) log(1 - t)`` (``t = |mu|``) of ``src``'s means.
    """
    mu = src[1:-1, 1:-1]  # [H, W]
    a = coupling * (src[:-2, 1:-1] + src[2:, 1:-1] + src[1:-1, :-2] + src[1:-1, 2:]) + field
    # tanh(a) = 1 - 2 / (exp(2a) + 1): inductor's vectorised exp is faster than its tanh on CPU (BENCHMARKS.md;
    # torch 2.13, AVX-512), and the identity is exact at both tails (exp -> inf gives 1, exp -> 0 gives -1); the
    # absolute error stays below 2e-7 (tests/test_ising.py checks it against torch.tanh)
    step = 1.0 - 2.0 / (torch.exp(2.0 * a) + 1.0) - mu
    if mask is not None:
        step = torch.where(mask, step, 0.0)
    dst[1:-1, 1:-1] = mu + damping * step
    residual = step.abs().amax(-1).amax()
    if not with_elbo:
        return residual, None, None
    energy = (mu * (a + field)).sum(-1).double().sum() / 2
    t = mu.abs()
    # log(1 + t) rather than log1p(t): t is in [0, 1], so the absolute error is the same (~1 ulp of 1) and it is faster
    plogp = ((1 + t) * torch.log(1 + t) + (1 - t) * torch.log((1 - t).clamp_min(1e-30))).sum(-1).double().sum()
    return residual, energy, plogp


# One wrapper per variant: each is its own code object, so each keeps its own compiled graphs (one static shape,
# then one dynamic-shape graph) and none pushes another out of torch._dynamo's per-function cache.
def _parallel_elbo(src, dst, field, coupling, damping, mask):
    return fused_half_sweep(src, dst, field, coupling, damping, None, True)


def _parallel_plain(src, dst, field, coupling, damping, mask):
    return fused_half_sweep(src, dst, field, coupling, damping, None, False)


def _colour_elbo(src, dst, field, coupling, damping, mask):
    return fused_half_sweep(src, dst, field, coupling, damping, mask, True)


def _colour_plain(src, dst, field, coupling, damping, mask):
    return fused_half_sweep(src, dst, field, coupling, damping, mask, False)


_VARIANTS = {(False, True): _parallel_elbo, (False, False): _parallel_plain,
             (True, True): _colour_elbo, (True, False): _colour_plain}
_COMPILED: dict = {}  # (masked, with_elbo) -> compiled callable, built on first use in this process
_compile = torch.compile  # indirection so the tests can simulate a machine where compiling fails
COMPILE_MIN_PIXELS = 512 * 512  # kernel="auto" compiles from this image size on (see IsingDenoiser)


def compiled_half_sweep(masked: bool, with_elbo: bool):
    key = (masked, with_elbo)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(_VARIANTS[key], fullgraph=True)
    return _COMPILED[key]


class CompiledSweeper:
    """:class:`MeanFieldSweeper`'s interface (``mu``, ``sweep``, ``elbo``) on the fused, compiled half-sweep.

    If compiling or running the compiled kernel fails (no C++ compiler, an unsupported torch build, ...), the
    means are untouched (the kernel writes only the spare buffer) and the sweeper carries on with the eager
    :class:`MeanFieldSweeper` from the same state; ``fallback_reason`` then says why.
    """

    def __init__(self, mu0: torch.Tensor, field: torch.Tensor, coupling: float, damping: float,
                 schedule: str = "parallel", offset: float = 0.0):
        self.buffers = [padded_state(mu0)[0], torch.zeros(mu0.shape[0] + 2, mu0.shape[1] + 2, dtype=mu0.dtype)]
        self.field, self.schedule, self.offset = field.contiguous(), schedule, offset
        self.coupling_value, self.damping_value = coupling, damping
        self.coupling = torch.tensor(coupling, dtype=mu0.dtype)  # tensors, not floats: no recompile per value
        self.damping = torch.tensor(damping, dtype=mu0.dtype)
        self.masks = list(checkerboard_masks(*mu0.shape)) if schedule == "checkerboard" else [None]
        self.eager: MeanFieldSweeper | None = None
        self.fallback_reason: str | None = None

    @property
    def mu(self) -> torch.Tensor:
        return self.eager.mu if self.eager is not None else self.buffers[0][1:-1, 1:-1]

    def _fall_back(self, error: Exception) -> None:
        self.fallback_reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
        self.eager = MeanFieldSweeper(self.mu.clone(), self.field, self.coupling_value, self.damping_value,
                                      self.schedule, self.offset)

    def elbo(self) -> float:
        """ELBO of the current means: the kernel's sums, its update written to the spare buffer and dropped."""
        if self.eager is None:
            try:
                kernel = compiled_half_sweep(self.masks[0] is not None, True)
                _, energy, plogp = kernel(self.buffers[0], self.buffers[1], self.field, self.coupling,
                                          self.damping, self.masks[0])
                return float(energy) + self.mu.numel() * math.log(2.0) - float(plogp) / 2 + self.offset
            except Exception as error:  # noqa: BLE001 - as in sweep()
                self._fall_back(error)
        return self.eager.elbo()

    def sweep(self, with_elbo: bool = False):
        if self.eager is None:
            try:
                return self._sweep(with_elbo)
            except Exception as error:  # noqa: BLE001 - any failure of the compiler means: use the eager kernel
                self._fall_back(error)
        return self.eager.sweep(with_elbo=with_elbo)

    def _sweep(self, with_elbo: bool):
        residual, elbo = 0.0, None
        for colour, mask in enumerate(self.masks):
            kernel = compiled_half_sweep(mask is not None, with_elbo and colour == 0)
            result, energy, plogp = kernel(self.buffers[0], self.buffers[1], self.field, self.coupling,
                                           self.damping, mask)
            self.buffers.reverse()  # the freshly written buffer holds the means from now on
            residual = max(residual, float(result))
            if energy is not None:
                elbo = float(energy) + self.mu.numel() * math.log(2.0) - float(plogp) / 2 + self.offset
        return (residual, elbo) if with_elbo else residual


def _max_abs(values: torch.Tensor) -> float:
    # One pass and no temporary (vector_norm(ord=inf) and abs().max() are several times slower on CPU).
    low, high = torch.aminmax(values)
    return max(-float(low), float(high))


def _sum(values: torch.Tensor) -> float:
    # Row sums in the tensor's dtype, then float64: as fast as a float32 sum, accurate to ~1e-7 per row.
    return float(values.sum(dim=-1).to(torch.float64).sum())


def torch_log_joint(z: torch.Tensor, field: torch.Tensor, offset_sum: float, coupling: float) -> torch.Tensor:
    """``log p~(z | x)`` for states ``z [..., H, W]``, one float64 value per leading index."""
    f64, dims = torch.float64, (-2, -1)
    edges = (torch.sum(z[..., 1:, :] * z[..., :-1, :], dim=dims, dtype=f64)
             + torch.sum(z[..., :, 1:] * z[..., :, :-1], dim=dims, dtype=f64))
    return coupling * edges + torch.sum(field * z, dim=dims, dtype=f64) + offset_sum


def icm_sweep(padded: torch.Tensor, z: torch.Tensor, field: torch.Tensor, coupling: float,
              masks, work: torch.Tensor) -> int:
    """One ICM sweep (notes 002 s3.7): each site takes the state maximising ``log p~`` given its neighbours.

    Colour by colour: same-colour sites do not interact, so updating them together is exactly coordinate-wise
    maximisation, and ``log p~`` never decreases. A site whose local field ``a_i`` is 0 keeps its state.
    Returns the number of sites that changed.
    """
    changed = 0
    for mask in masks:
        a = neighbour_sum(padded, work)
        torch.add(field, a, alpha=coupling, out=a)
        best = torch.where(a > 0, 1.0, torch.where(a < 0, -1.0, z)).to(z.dtype)
        new = torch.where(mask, best, z)
        changed += int((new != z).sum())
        z.copy_(new)
    return changed


def gibbs_sweep(padded: torch.Tensor, z: torch.Tensor, field: torch.Tensor, coupling: float,
                masks, work: torch.Tensor, generator: torch.Generator) -> None:
    """One checkerboard Gibbs sweep over all chains ``z [C, H, W]``: ``p(z_i = +1 | rest) = sigmoid(2 a_i)``.

    Same-colour sites are conditionally independent given the other colour, so sampling a colour at once is an
    exact Gibbs step.
    """
    for mask in masks:
        a = neighbour_sum(padded, work)
        torch.add(field, a, alpha=coupling, out=a)
        uniform = torch.rand(a.shape, generator=generator, dtype=a.dtype)
        sample = torch.where(uniform < torch.sigmoid(2.0 * a), 1.0, -1.0).to(z.dtype)
        z.copy_(torch.where(mask, sample, z))


# ------------------------------------------------------------------------------------------------------------
METHODS = ("meanfield", "icm", "gibbs")
SCHEDULES = ("parallel", "checkerboard")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
KERNELS = ("auto", "compiled", "eager")


class IsingDenoiser(BaseEstimator):
    """Denoise a binary image under the Ising posterior of the module docstring.

    Parameters
    ----------
    coupling : J, the prior's edge weight (each undirected 4-neighbour edge counted once).
    noise : ``"gaussian"`` (``x = z + sigma * eps``) or ``"flip"`` (each pixel flipped with ``flip_prob``).
    sigma : noise standard deviation (> 0), used when ``noise="gaussian"``.
    flip_prob : flip probability in (0, 0.5), used when ``noise="flip"``; see :func:`flip_prob_from_evidence`.
    damping : lambda in (0, 1] of ``mu <- (1 - lambda) mu + lambda tanh(a)``; 1 = undamped, smaller = more damping.
    method : ``"meanfield"`` (notes 002 s3.3), ``"icm"`` (s3.7, iterated conditional modes) or ``"gibbs"``.
    schedule : mean-field only: ``"parallel"`` (every site from the old means) or ``"checkerboard"`` (the two
        colours in turn; never decreases the ELBO). ICM and Gibbs always use the checkerboard.
    max_sweeps : most sweeps (mean-field, ICM); the number of sweeps run by Gibbs.
    tol : mean-field stops when ``max_i |tanh(a_i) - mu_i| < tol``; ICM stops when a sweep changes nothing.
    burn_in : Gibbs sweeps discarded before averaging (default ``max_sweeps // 4``).
    n_chains : independent Gibbs chains run side by side (their samples are pooled).
    random_state : seed of the Gibbs sampler (None: fresh entropy).
    dtype : ``"float32"`` (fast) or ``"float64"``.
    kernel : mean-field only. ``"compiled"``: the fused sweep (:func:`fused_half_sweep`) through torch.compile,
        which costs a one-off compile per process (seconds; see BENCHMARKS.md) and then runs a sweep with its
        ELBO in one pass; ``"eager"``: plain torch ops; ``"auto"`` (default): compiled for images of at least
        ``COMPILE_MIN_PIXELS`` pixels, eager below. Where compiling fails, the fit falls back to eager
        (``"compiled"`` also warns); ``kernel_`` says which ran.
    elbo_every : mean-field only: compute the ELBO every this many sweeps (1 = every sweep). The convergence
        check (the residual) runs every sweep regardless; the ELBO is a diagnostic, and its two logarithms per
        pixel cost more than the sweep itself. The default is 1 because the ELBO after every sweep is what
        ``denoise`` plots, and it shows a sweep that lowered it (a damped parallel update is not coordinate
        ascent and can; the checkerboard schedule cannot); pass 10 for a fit about twice as fast whose curve has
        a point every 10 sweeps (both timed in BENCHMARKS.md).

    Fitted attributes
    -----------------
    posterior_mean_ : ``[H, W]`` float64 in [-1, 1]: the mean-field means ``mu``, the ICM state, or the Gibbs
        average of the samples after burn-in.
    elbo_history_ : mean-field ELBO at the start (entry 0) and after each sweep (entry k), so
        ``n_sweeps_ + 1`` values with ``elbo_every=1``; with ``elbo_every=n`` after sweeps 0, n, 2n, ... and
        after the last one (``elbo_sweeps_`` lists those sweep counts); empty for ICM and Gibbs.
    log_joint_history_ : ICM: ``log p~(z | x)`` of the state after each sweep; Gibbs: its mean over chains;
        mean-field: empty.
    n_sweeps_ : sweeps run. converged_ : whether the stopping rule was met (always True for Gibbs).
    kernel_ : ``"compiled"`` or ``"eager"`` (mean-field), the kernel that ran; ``kernel_fallback_`` the reason
        the compiled kernel was not used after all (None if it was, or was not asked for).
    model_ : the :class:`IsingModel` used.
    """

    def __init__(self, coupling=1.0, noise="gaussian", sigma=1.0, flip_prob=0.1, damping=0.5,
                 method="meanfield", schedule="parallel", max_sweeps=1000, tol=1e-4, burn_in=None, n_chains=1,
                 random_state=None, dtype="float32", kernel="auto", elbo_every=1, progress=False):
        self.coupling, self.noise, self.sigma, self.flip_prob = coupling, noise, sigma, flip_prob
        self.damping, self.method, self.schedule = damping, method, schedule
        self.max_sweeps, self.tol, self.burn_in, self.n_chains = max_sweeps, tol, burn_in, n_chains
        self.random_state, self.dtype = random_state, dtype
        self.kernel, self.elbo_every, self.progress = kernel, elbo_every, progress

    def _validate(self) -> None:
        self.model_ = IsingModel(self.coupling, self.noise, self.sigma, self.flip_prob)
        _check_real("damping", self.damping, low=0.0, high=1.0, high_open=False)
        _check_real("tol", self.tol, low=0.0, low_open=False)
        for name, allowed in (("method", METHODS), ("schedule", SCHEDULES), ("dtype", tuple(DTYPES)),
                              ("kernel", KERNELS)):
            if getattr(self, name) not in allowed:
                raise ElbolabError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("max_sweeps", "n_chains", "elbo_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ElbolabError(f"{name} must be a positive integer, got {value!r}.")
        if self.burn_in is not None and (isinstance(self.burn_in, bool) or not isinstance(
                self.burn_in, (int, np.integer)) or not 0 <= self.burn_in < self.max_sweeps):
            raise ElbolabError(f"burn_in must be an integer in [0, max_sweeps={self.max_sweeps}), "
                               f"got {self.burn_in!r}.")
        if self.random_state is not None and (isinstance(self.random_state, bool) or not isinstance(
                self.random_state, (int, np.integer)) or self.random_state < 0):
            raise ElbolabError(f"random_state must be None or a non-negative integer, got {self.random_state!r}.")

    def fit(self, observed, y=None) -> IsingDenoiser:
        """Run the chosen method on the observed ``[H, W]`` image; returns self."""
        self._validate()
        x = check_image(observed, self.noise)  # float64; may be the caller's own array: never written to
        dtype = DTYPES[self.dtype]
        field, offset = self.model_.field_and_offset(x, dtype)
        coupling = float(self.coupling)
        self.elbo_history_, self.log_joint_history_, self.elbo_sweeps_ = [], [], []
        self.kernel_, self.kernel_fallback_ = "eager", None
        # progress=True: a bar on a terminal, else a line every 10 s
        with Progress(f"{self.method}: at most {self.max_sweeps:,} sweeps (fewer when converged)", self.max_sweeps,
                      "sweeps", enabled=bool(self.progress)) as self._sweeps:
            if self.method == "meanfield":
                mu0 = torch.from_numpy(x).to(dtype, copy=True).clamp_(-1.0, 1.0)
                self._fit_meanfield(mu0, field, offset, coupling)
                return self
            start = torch.from_numpy(np.where(x >= 0, 1.0, -1.0)).to(dtype)  # sign(x), ties to +1
            if self.method == "icm":
                self._fit_icm(start, field, offset, coupling)
            else:
                self._fit_gibbs(start, field, offset, coupling)
        return self

    def _fit_meanfield(self, mu0, field, offset, coupling) -> None:
        # Notes 002 s3.4: initialise mu = x, clipped to [-1, 1] where a spin's mean must lie (Gaussian x may not).
        compiled = self.kernel == "compiled" or (self.kernel == "auto" and mu0.numel() >= COMPILE_MIN_PIXELS)
        kind = CompiledSweeper if compiled else MeanFieldSweeper
        sweeper = kind(mu0, field, coupling, float(self.damping), self.schedule, offset)
        self.converged_, self.n_sweeps_, self.elbo_sweeps_ = False, 0, []
        for _ in range(self.max_sweeps):
            if self.n_sweeps_ % self.elbo_every == 0:
                residual, elbo_before = sweeper.sweep(with_elbo=True)
                self.elbo_history_.append(elbo_before)
                self.elbo_sweeps_.append(self.n_sweeps_)
            else:
                residual = sweeper.sweep()
            self.n_sweeps_ += 1
            self._sweeps.update(1)
            if residual < self.tol:
                self.converged_ = True
                break
        self.elbo_history_.append(sweeper.elbo())
        self.elbo_sweeps_.append(self.n_sweeps_)
        self.posterior_mean_ = np.array(sweeper.mu.numpy(), dtype=np.float64)  # one pass, a new array
        self.kernel_fallback_ = getattr(sweeper, "fallback_reason", None)
        self.kernel_ = "compiled" if compiled and self.kernel_fallback_ is None else "eager"
        if self.kernel == "compiled" and self.kernel_fallback_ is not None:
            warnings.warn(f"torch.compile could not build the fused mean-field sweep ({self.kernel_fallback_}); "
                          "the fit used the eager kernel (same result, slower). kernel='auto' or 'eager' "
                          "skips this warning.", RuntimeWarning, stacklevel=3)
        if not self.converged_:
            warnings.warn(
                f"Mean-field did not converge in max_sweeps={self.max_sweeps} sweeps: the fixed-point residual "
                f"max|tanh(a) - mu| is {residual:.3g} > tol={self.tol}. Try more sweeps (max_sweeps), more "
                f"damping (a smaller damping, now {self.damping}) or schedule='checkerboard'.",
                ConvergenceWarning, stacklevel=3)

    def _fit_icm(self, z0, field, offset, coupling) -> None:
        padded, z = padded_state(z0)
        masks, work = checkerboard_masks(*z.shape), torch.empty_like(z)
        self.converged_, self.n_sweeps_ = False, 0
        for _ in range(self.max_sweeps):
            changed = icm_sweep(padded, z, field, coupling, masks, work)
            self.n_sweeps_ += 1
            self._sweeps.update(1)
            self.log_joint_history_.append(float(torch_log_joint(z, field, offset, coupling)))
            if changed == 0:
                self.converged_ = True
                break
        self.posterior_mean_ = np.array(z.numpy(), dtype=np.float64)
        if not self.converged_:
            warnings.warn(f"ICM still changed {changed} pixels in its last sweep (max_sweeps={self.max_sweeps}); "
                          "try more sweeps.", ConvergenceWarning, stacklevel=3)

    def _fit_gibbs(self, z0, field, offset, coupling) -> None:
        seed = self.random_state if self.random_state is not None else int(np.random.SeedSequence().entropy % 2**63)
        generator = torch.Generator().manual_seed(int(seed))
        padded, z = padded_state(z0.expand(self.n_chains, *z0.shape))  # [C, H, W]
        masks, work = checkerboard_masks(*z0.shape), torch.empty_like(z)
        burn_in = self.max_sweeps // 4 if self.burn_in is None else int(self.burn_in)
        total = torch.zeros(z0.shape, dtype=torch.float64)
        for sweep in range(1, self.max_sweeps + 1):
            gibbs_sweep(padded, z, field, coupling, masks, work, generator)
            self._sweeps.update(1)
            self.log_joint_history_.append(float(torch_log_joint(z, field, offset, coupling).mean()))
            if sweep > burn_in:
                total += z.sum(dim=0, dtype=torch.float64)
        self.n_sweeps_, self.converged_ = self.max_sweeps, True
        self.posterior_mean_ = (total / ((self.max_sweeps - burn_in) * self.n_chains)).numpy()

    def predict(self) -> np.ndarray:
        """The ``{-1, +1}`` estimate ``sign(posterior_mean_)`` (ties to +1) of the fitted image, float64."""
        if not hasattr(self, "posterior_mean_"):
            raise ElbolabError("This IsingDenoiser is not fitted yet; call fit(observed) first.")
        return np.where(self.posterior_mean_ >= 0, 1.0, -1.0)

    def fit_predict(self, observed) -> np.ndarray:
        return self.fit(observed).predict()
