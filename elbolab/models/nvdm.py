"""Neural Variational Document Model (Miao, Yu & Blunsom 2016, "Neural Variational Inference for Text Processing",
section 3; notes 004 "Neural Variational Document Model").

A document d is a bag of words, counts c_w over a vocabulary of V words (N_d = sum_w c_w). Generative model:

    h ~ N(0, I_K),    p(w | h) = softmax(R^T h + b)_w = exp(-E(w; h)) / sum_v exp(-E(v; h)),  E(w; h) = -h^T R w - b_w

    log p(d | h) = sum_w c_w log p(w | h)     (the N_d words in their order: no multinomial coefficient, as the
                                                paper's perplexity; ``WordSequence``)

Inference network: an MLP on the counts (500 tanh units by default, as the authors' code; ReLU on raw counts
diverged for us on 20news) gives q(h|d) = N(mu(d), diag sigma^2(d)).
Objective (the paper's section 3; notes 000 eq. 5): ELBO(d) = E_q[log p(d|h)] - KL(q(h|d) || N(0, I)), KL in closed
form. R is the decoder's weight (``decoder.weight`` [V, K]: row w is word w's vector R_w). Evaluation reports the
paper's perplexity exp(mean_d -ELBO(d) / N_d) and the same with an importance-sampled log p(d) (tighter).

``updates``: "joint" trains encoder and decoder together; "alternate" updates one parameter group per step
(decoder first, ``alternate_every`` steps each), as the paper optimises the generative model and the inference
network alternately (the authors' TensorFlow code alternates in blocks of 10 epochs each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from elbolab.data.core import Batch
from elbolab.errors import ElbolabError
from elbolab.figures.standard import standard_figures
from elbolab.figures.topics import topic_figures, write_vocabulary
from elbolab.likelihoods import LikelihoodHead, register_likelihood
from elbolab.models.base import LossOutput, ModelConfig, option
from elbolab.models.registry import register_model
from elbolab.models.vae import VAE
from elbolab.schedules import StepContext

UPDATES = ("joint", "alternate")


class WordSequence(Distribution):
    """The words of a document in a fixed order, each drawn from Categorical(softmax(logits)): value = counts
    [..., V], log_prob = sum_w c_w log softmax(logits)_w. This is torch's Multinomial log_prob without the
    multinomial coefficient log(N! / prod_w c_w!), i.e. the sum of Categorical log-probabilities of the tokens."""

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(self, logits: torch.Tensor, validate_args: bool = False):
        self.logits = logits.log_softmax(-1)  # [..., V], normalised
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return (value * self.logits).sum(-1)  # [...]


@register_likelihood("bag-of-words")
class BagOfWordsHead(LikelihoodHead):
    """p(d|h) as a ``WordSequence`` over the decoder's V logits; its mean (for pictures) is the word distribution."""

    support = "real"  # counts: scores_density checks them

    def forward(self, out):
        return WordSequence(out)

    def mean(self, out):
        return out.softmax(-1)

    def scores_density(self, x) -> bool:
        x = torch.as_tensor(x)
        return bool((torch.isfinite(x) & (x >= 0) & (x == x.round())).all())


@dataclass(frozen=True)
class NVDMConfig(ModelConfig):
    latent_dim: int = option(50, "dimensions of h (the paper: 50 or 200)")
    hidden: tuple[int, ...] = option((500,), "hidden layer sizes of the MLP encoder (the decoder is linear)")
    activation: str = option("tanh", "encoder non-linearity (tanh as the authors' code; relu diverged on 20news)")
    likelihood: str = option("bag-of-words", "p(d|h): bag-of-words (the only one NVDM supports)")
    updates: str = option("joint", "joint | alternate (one parameter group per step, decoder first)")
    alternate_every: int = option(1, "steps per phase with updates=alternate")
    eval_samples: int = option(20, "samples of q(h|d) for the ELBO perplexity in 'elbolab eval'")

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.likelihood == "bag-of-words", "likelihood bag-of-words", self.likelihood),
            (self.architecture == "mlp", "architecture mlp", self.architecture),
            (self.updates in UPDATES, f"updates in {list(UPDATES)}", self.updates),
            (self.alternate_every >= 1, "alternate_every >= 1 steps", self.alternate_every),
            (self.eval_samples >= 1, "eval_samples >= 1", self.eval_samples),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"nvdm: expected {expected}, got {got!r}; see 'elbolab models nvdm'")


def perplexity(log_likelihood: torch.Tensor, n_words: torch.Tensor) -> dict:
    """Perplexities from per-document log-likelihoods (or bounds) [N] and word counts [N], documents with no words
    left out: ``per_document`` exp(mean_d -log p(d) / N_d) (the paper's), ``corpus`` exp(-sum_d log p(d) / sum_d N_d)
    (one pooled rate, as scikit-learn's LDA perplexity)."""
    log_likelihood, n_words = log_likelihood.double().cpu(), n_words.double().cpu()
    keep = n_words > 0
    if not keep.any():
        raise ElbolabError("perplexity: expected at least one document with words, got none")
    ll, n = log_likelihood[keep], n_words[keep]
    return {"per_document": math.exp(float((-ll / n).mean())), "corpus": math.exp(float(-ll.sum() / n.sum())),
            "documents": int(keep.sum()), "empty_documents": int((~keep).sum()), "words": int(n.sum())}


def word_counts(data) -> torch.Tensor:
    """N_d of every document of a TensorData (sparse or dense x), [N] float64."""
    x = data.x
    if hasattr(x, "nnz"):
        return torch.from_numpy(x.sum(axis=1).A1.astype("float64"))
    return data.rows(torch.arange(len(data))).double().sum(-1)


@register_model("nvdm")
class NVDM(VAE):
    """MLP encoder q(h|d), linear softmax decoder p(w|h) = softmax(R^T h + b), N(0, I) prior."""

    config_class = NVDMConfig

    def build_encoder(self, config: ModelConfig) -> nn.Module:
        encoder = super().build_encoder(config)
        # q starts with unit variances whatever the document length (the authors' code does the same): with raw
        # counts as input a random log-variance layer can start at exp(hundreds)
        nn.init.zeros_(encoder.log_var.weight)
        nn.init.zeros_(encoder.log_var.bias)
        return encoder

    def build_decoder(self, config: ModelConfig, input_dim: int) -> nn.Module:
        return nn.Linear(input_dim, config.input_dim)  # logits R^T h + b: weight [V, K] = R^T, bias b [V]

    def word_vectors(self) -> torch.Tensor:
        """R_w for every word, [V, K] (the rows of decoder.weight)."""
        return self.decoder.weight

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"decoder": list(self.decoder.parameters()) + list(self.likelihood_head.parameters()),
                "encoder": list(self.encoder.parameters())}

    def phase(self, step: int) -> str:
        """The group updated at ``step`` with updates=alternate."""
        return "decoder" if (step // self.config.alternate_every) % 2 == 0 else "encoder"

    def loss(self, batch: Batch, ctx: StepContext) -> LossOutput:
        out = super().loss(batch, ctx)  # the (beta-weighted) negative ELBO and the metrics elbo, kl, recon [B]
        loss = out.losses["model"]
        out.metrics["log_perplexity"] = -out.metrics["elbo"] / batch.x.sum(-1).clamp_min(1.0)  # [B]
        if self.config.updates == "joint":
            return LossOutput({"decoder": loss, "encoder": loss}, out.metrics)
        active = self.phase(ctx.step)
        return LossOutput({name: loss if name == active else None for name in ("decoder", "encoder")}, out.metrics)

    @torch.no_grad()
    def document_elbo(self, batch: Batch, samples: int) -> torch.Tensor:
        """ELBO(d) with E_q[log p(d|h)] averaged over ``samples`` draws and the KL in closed form, [B]."""
        q = self.encode(batch)
        recon = self.decode(q.sample((samples,)), batch).log_prob(batch.x).mean(0)  # [S, B] -> [B]
        return recon - torch.distributions.kl_divergence(q, self.prior(batch))

    @torch.no_grad()
    def eval_metrics(self, data, per_example_log_px: torch.Tensor) -> dict:
        n_words = word_counts(data)  # [N]
        param = next(self.parameters())
        bounds = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for index in torch.arange(len(data)).split(250):
                bounds.append(self.document_elbo(data.batch(index).to(param), self.config.eval_samples).cpu())
        elbo = torch.cat(bounds)  # [N]
        from_elbo, from_is = perplexity(elbo, n_words), perplexity(per_example_log_px, n_words)
        return {"perplexity_elbo": from_elbo["per_document"], "perplexity_is": from_is["per_document"],
                "corpus_perplexity_elbo": from_elbo["corpus"], "corpus_perplexity_is": from_is["corpus"],
                "elbo_samples": self.config.eval_samples, "documents": from_elbo["documents"],
                "empty_documents_left_out": from_elbo["empty_documents"], "words": from_elbo["words"]}

    def epoch_end(self, epoch: int, run_dir, val) -> None:
        vocabulary = getattr(val, "meta", {}).get("vocabulary") if val is not None else None
        if vocabulary is not None:
            write_vocabulary(run_dir, vocabulary)

    def figures(self, run_dir, splits) -> list:
        paths = standard_figures(self, run_dir, splits)
        vocabulary = splits.train.meta.get("vocabulary")
        if vocabulary is not None:
            paths += topic_figures(self, vocabulary, run_dir)
        return paths
