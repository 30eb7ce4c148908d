"""Disentanglement metrics: how well single latent dimensions capture single generative factors (the "latent
disentanglement" that beta > 1 and the total-correlation penalty aim at, notes 004).

Each metric takes an encoder (images [B, D] -> latent means [B, d]; ``model_encoder`` makes one of a model) and a
factor-addressable data set (``FactorData``: ``elbolab.data.sprites.Sprites`` or ``DSprites``). Factors with a
single value (dSprites' colour) are never chosen as the fixed factor nor scored. Every draw comes from
``numpy.random.default_rng(seed)``: the same seed gives the same score.

* beta-VAE metric (Higgins et al. 2017, s. 3): pick a factor k; draw L pairs of images that share factor k (all other
  factors drawn independently); the example is z_diff = 1/L sum_l |z(x_1l) - z(x_2l)| [d] with label k. A linear
  classifier (logistic regression) predicts k; the score is its accuracy on held-out examples. Fixing k makes
  z_diff small in the dimensions that code k alone. Chance: 1/K for K varying factors.
* FactorVAE metric (Kim & Mnih 2018, s. 4): divide each dimension by its standard deviation over the data; pick k;
  draw L images sharing one value of factor k; the vote is (argmin_j Var_L[z_j / s_j], k), dimensions whose
  variance over the data is below ``prune`` (collapsed) excluded. The majority-vote classifier maps each dimension
  to its most frequent factor among the training votes; the score is its accuracy on held-out votes. It needs one
  dimension per factor: a code that leaves out one factor scores about (K - 1)/K, where the beta-VAE metric can
  still score 1 (Kim & Mnih's criticism). Chance: about 1/K.
* Mutual information gap (Chen et al. 2018, s. 5; the discretised estimator of Locatello et al. 2019):
  MIG = 1/K sum_k (I(z_j(k); v_k) - max_{j != j(k)} I(z_j; v_k)) / H(v_k), j(k) = argmax_j I(z_j; v_k), with each
  latent mean cut into ``bins`` equal-width bins over its range and I, H the empirical discrete mutual information
  and entropy (scikit-learn's mutual_info_score). 1 for a code with one dimension per factor (when the bins resolve
  every factor value), near 0 for codes independent of the factors (a small positive bias ~ bins * values / 2N).

Two protocols (``disentanglement_scores(protocol=...)``, ``elbolab eval --disentanglement-protocol``): "full" is
Locatello et al.'s (2019): L = 64, 10,000 training and 5,000 evaluation examples (beta-VAE and FactorVAE metrics),
10,000 images for the FactorVAE scale and for MIG, 20 bins: about 2.9 million images drawn and encoded. "quick" (the
default) keeps L = 64 and 20 bins with 2,000 training and 1,000 evaluation examples and 5,000 images for MIG and the
scale (about 0.6 million images): the held-out accuracies then have a binomial s.e. of at most 0.016 (reported as
``eval_accuracy_se``), against 0.007 for "full". All counts are parameters too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from elbolab.data.sprites import Sprites, find_dsprites, read_dsprites
from elbolab.errors import ElbolabError
from elbolab.progress import Progress

Encoder = Callable[[torch.Tensor], torch.Tensor]  # images [B, D] -> latent means [B, d]

PROTOCOLS = {
    "quick": {"num_train": 2_000, "num_eval": 1_000, "num_points": 5_000},
    "full": {"num_train": 10_000, "num_eval": 5_000, "num_points": 10_000},  # Locatello et al. 2019
}


def images_drawn(batch_size: int, num_train: int, num_eval: int, num_points: int) -> int:
    """How many images the three metrics draw and encode (their cost)."""
    return (num_train + num_eval) * batch_size * 3 + 2 * num_points


class FactorData(Protocol):
    """A data set addressable by generative factor (``elbolab.data.sprites.Sprites``, ``DSprites``)."""

    factor_names: Sequence[str]
    factor_sizes: Sequence[int]

    def sample_factors(self, n: int, generator: np.random.Generator) -> np.ndarray:
        """[n, F] integer factor indices, each factor uniform and independent."""

    def images(self, factors: np.ndarray) -> torch.Tensor:
        """float [n, D] images of factor indices [n, F]."""


def model_encoder(model, batch_size: int = 512) -> Encoder:
    """The latent means of a model (its ``latent_means``, group "z" or the first group) as an Encoder."""
    model.eval()

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        out = []
        for chunk in x.split(batch_size):
            means = model.latent_means(chunk.to(device))
            out.append((means["z"] if "z" in means else next(iter(means.values()))).cpu())
        return torch.cat(out)  # [B, d]

    return encode


def encode_factors(encode: Encoder, data: FactorData, factors: np.ndarray, batch_size: int = 4096,
                   progress: Progress | None = None) -> np.ndarray:
    """Latent means [n, d] (float64) of the images of factor indices [n, F], drawn and encoded in batches."""
    parts = []
    for i in range(0, len(factors), batch_size):
        rows = factors[i:i + batch_size]
        parts.append(np.asarray(encode(data.images(rows)).detach().cpu(), dtype=np.float64))
        if progress is not None:
            progress.update(len(rows))
    codes = np.concatenate(parts)
    if codes.ndim != 2 or len(codes) != len(factors) or not np.isfinite(codes).all():
        raise ElbolabError(f"expected the encoder to return finite latent means [{len(factors)}, d], got "
                           f"{codes.shape} with {int((~np.isfinite(codes)).sum())} non-finite values")
    return codes


def varying_factors(data: FactorData) -> list[int]:
    """The factors with more than one value (the ones a metric fixes and scores)."""
    found = [k for k, size in enumerate(data.factor_sizes) if size > 1]
    if len(found) < 2:
        raise ElbolabError(f"expected at least two factors with more than one value, got sizes "
                           f"{tuple(data.factor_sizes)}")
    return found


def _check_counts(**counts) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ElbolabError(f"expected {name} as an integer >= 1, got {value!r}")


def _fixed_factor_batches(data: FactorData, rng: np.random.Generator, n: int, size: int, pairs: bool):
    """n groups of ``size`` factor rows sharing one factor k (uniform over the varying factors).

    Returns (factors [n * size * (2 if pairs else 1), F], k [n]): with ``pairs``, the two halves of each group are
    independent draws that share factor k row by row; without, all rows of a group share one value of k."""
    varying = varying_factors(data)
    k = rng.choice(varying, size=n)  # [n]
    first = data.sample_factors(n * size, rng).reshape(n, size, -1)  # [n, L, F]
    rows = np.arange(n)
    if pairs:
        second = data.sample_factors(n * size, rng).reshape(n, size, -1)  # [n, L, F]
        second[rows, :, k] = first[rows, :, k]
        return np.concatenate([first, second], axis=1).reshape(-1, first.shape[-1]), k
    first[rows, :, k] = first[rows, :1, k]  # every row takes the group's first value of factor k
    return first.reshape(-1, first.shape[-1]), k


def _accuracy_se(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on n held-out examples."""
    return float(np.sqrt(accuracy * (1 - accuracy) / n))


def _beta_vae_examples(encode, data, rng, n, size, progress=None):
    factors, k = _fixed_factor_batches(data, rng, n, size, pairs=True)
    codes = encode_factors(encode, data, factors, progress=progress).reshape(n, 2, size, -1)  # [n, 2, L, d]
    return np.abs(codes[:, 0] - codes[:, 1]).mean(1), k  # z_diff [n, d], labels [n]


def beta_vae_score(encode: Encoder, data: FactorData, *, seed: int = 0, batch_size: int = 64,
                   num_train: int = 10_000, num_eval: int = 5_000, progress: Progress | None = None) -> dict:
    """Higgins et al.'s metric: accuracy of a logistic regression predicting the fixed factor from z_diff."""
    from sklearn.linear_model import LogisticRegression

    _check_counts(batch_size=batch_size, num_train=num_train, num_eval=num_eval)
    rng = np.random.default_rng(seed)
    x_train, y_train = _beta_vae_examples(encode, data, rng, num_train, batch_size, progress)
    x_eval, y_eval = _beta_vae_examples(encode, data, rng, num_eval, batch_size, progress)
    classifier = LogisticRegression(max_iter=2000, random_state=seed).fit(x_train, y_train)
    accuracy = float(classifier.score(x_eval, y_eval))
    return {"train_accuracy": float(classifier.score(x_train, y_train)), "eval_accuracy": accuracy,
            "eval_accuracy_se": _accuracy_se(accuracy, num_eval), "chance": 1.0 / len(varying_factors(data))}


def _factor_vae_votes(encode, data, rng, n, size, scale, active, progress=None):
    factors, k = _fixed_factor_batches(data, rng, n, size, pairs=False)
    codes = encode_factors(encode, data, factors, progress=progress).reshape(n, size, -1) / scale  # [n, L, d]
    variances = codes.var(axis=1, ddof=1)[:, active]  # [n, d_active]
    return active[variances.argmin(axis=1)], k  # dimension [n], factor [n]


def factor_vae_score(encode: Encoder, data: FactorData, *, seed: int = 0, batch_size: int = 64,
                     num_train: int = 10_000, num_eval: int = 5_000, num_variance_estimate: int = 10_000,
                     prune: float = 0.05, progress: Progress | None = None) -> dict:
    """Kim & Mnih's metric: accuracy of the majority-vote classifier from argmin-variance dimension to factor.

    Votes whose dimension no training vote chose count as errors; ties between factors go to the lower index."""
    _check_counts(batch_size=batch_size, num_train=num_train, num_eval=num_eval,
                  num_variance_estimate=num_variance_estimate)
    if batch_size < 2:
        raise ElbolabError(f"expected batch_size >= 2 (a variance needs two codes), got {batch_size}")
    rng = np.random.default_rng(seed)
    varying = varying_factors(data)
    codes = encode_factors(encode, data, data.sample_factors(num_variance_estimate, rng), progress=progress)
    variance = codes.var(axis=0, ddof=1)  # [d]
    active = np.flatnonzero(variance >= prune)
    result = {"num_active_dims": int(len(active)), "chance": 1.0 / len(varying)}
    if len(active) == 0:
        if progress is not None:  # no vote to cast: the images its votes would have drawn count as done
            progress.update((num_train + num_eval) * batch_size)
        return {**result, "train_accuracy": 0.0, "eval_accuracy": 0.0}
    scale = np.sqrt(np.where(variance > 0, variance, 1.0))  # [d]; collapsed dimensions are never voted for
    d_train, k_train = _factor_vae_votes(encode, data, rng, num_train, batch_size, scale, active, progress)
    d_eval, k_eval = _factor_vae_votes(encode, data, rng, num_eval, batch_size, scale, active, progress)
    votes = np.zeros((len(variance), len(data.factor_sizes)), dtype=np.int64)  # [d, F]
    np.add.at(votes, (d_train, k_train), 1)
    majority = votes.argmax(axis=1)  # [d]
    seen = votes.sum(axis=1) > 0  # [d]
    eval_correct = seen[d_eval] & (majority[d_eval] == k_eval)
    accuracy = float(eval_correct.mean())
    return {**result, "train_accuracy": float(votes.max(axis=1).sum() / num_train), "eval_accuracy": accuracy,
            "eval_accuracy_se": _accuracy_se(accuracy, num_eval), "votes": votes[:, varying].tolist()}


def discretise(codes: np.ndarray, bins: int) -> np.ndarray:
    """Each column cut into ``bins`` equal-width bins over its own [min, max]: int [n, d] in 0 .. bins - 1."""
    low, high = codes.min(axis=0), codes.max(axis=0)  # [d]
    width = np.where(high > low, high - low, 1.0)
    return np.clip(np.floor((codes - low) / width * bins), 0, bins - 1).astype(np.int64)


def mutual_information_gap(encode: Encoder, data: FactorData, *, seed: int = 0, num_points: int = 10_000,
                           bins: int = 20, progress: Progress | None = None) -> dict:
    """Chen et al.'s MIG from discretised latent means; also the per-factor gaps and the MI matrix (nats)."""
    from sklearn.metrics import mutual_info_score

    _check_counts(num_points=num_points, bins=bins)
    rng = np.random.default_rng(seed)
    factors = data.sample_factors(num_points, rng)  # [n, F]
    binned = discretise(encode_factors(encode, data, factors, progress=progress), bins)  # [n, d]
    varying = varying_factors(data)
    mi = np.array([[mutual_info_score(factors[:, k], binned[:, j]) for k in varying]
                   for j in range(binned.shape[1])])  # [d, K]
    entropy = np.array([mutual_info_score(factors[:, k], factors[:, k]) for k in varying])  # [K]
    top = np.sort(mi, axis=0)[::-1]  # [d, K], largest first
    second = top[1] if len(top) > 1 else np.zeros(len(varying))
    gaps = (top[0] - second) / entropy  # [K]
    names = [data.factor_names[k] for k in varying]
    return {"mig": float(gaps.mean()), "per_factor": dict(zip(names, gaps.tolist())),
            "mutual_information": mi.tolist(), "entropy": dict(zip(names, entropy.tolist()))}


def disentanglement_scores(encode: Encoder, data: FactorData, *, seed: int = 0, batch_size: int = 64,
                           protocol: str = "quick", num_train: int | None = None, num_eval: int | None = None,
                           num_points: int | None = None, bins: int = 20, progress: bool = True) -> dict:
    """The three metrics with shared sample sizes: {"beta_vae": ..., "factor_vae": ..., "mig": ..., "protocol"};
    the sizes come from ``protocol`` ("quick" or "full", see the module docstring) unless given."""
    if protocol not in PROTOCOLS:
        raise ElbolabError(f"expected a disentanglement protocol in {', '.join(PROTOCOLS)}, got {protocol!r}")
    sizes = {**PROTOCOLS[protocol], **{k: v for k, v in (("num_train", num_train), ("num_eval", num_eval),
                                                           ("num_points", num_points)) if v is not None}}
    total = images_drawn(batch_size, **sizes)
    with Progress(f"disentanglement metrics ({protocol} protocol): drawing and encoding {total:,} images",
                  total=total, unit="images", enabled=progress) as bar:
        scores = {
            "beta_vae": beta_vae_score(encode, data, seed=seed, batch_size=batch_size, num_train=sizes["num_train"],
                                       num_eval=sizes["num_eval"], progress=bar),
            "factor_vae": factor_vae_score(encode, data, seed=seed, batch_size=batch_size,
                                           num_train=sizes["num_train"], num_eval=sizes["num_eval"],
                                           num_variance_estimate=sizes["num_points"], progress=bar),
            "mig": mutual_information_gap(encode, data, seed=seed, num_points=sizes["num_points"], bins=bins,
                                          progress=bar),
        }
    return {**scores, "protocol": {"name": protocol, "batch_size": batch_size, "bins": bins, **sizes,
                                   "images": total, "seconds": round(bar.seconds(), 1)}}


def run_factor_data(data_info: dict, data_dir=None) -> FactorData:
    """The factor-addressable data set a run was trained on (its config's ``data``): ``sprites`` or ``dsprites``."""
    source = data_info.get("source")
    if source == "sprites":
        return Sprites()
    if source == "dsprites":
        return read_dsprites(find_dsprites(data_dir or data_info.get("data_dir")))
    raise ElbolabError(f"--disentanglement needs data with known generative factors (--data sprites or dsprites); "
                       f"this run was trained on {source!r}")
