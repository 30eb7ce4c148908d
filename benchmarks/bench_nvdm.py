"""NVDM on 20 Newsgroups (Miao, Yu & Blunsom 2016, table 1a) next to scikit-learn's LDA on the same split, by elbolab.

Data: /work/shared/data/20news (train.feat: 11,259 documents, 10,259 trained on and 1,000 for validation by seed 0;
test.feat: 7,488 documents, 1,995-word vocabulary). NVDM: MLP encoder 500 units (tanh: ReLU diverged at lr 5e-4),
K = 50 or 200, Adam (--lr, batch --batch-size), --epochs epochs, joint or alternating updates.
Perplexities on test.feat:

* NVDM "ELBO": exp(mean_d -ELBO(d) / N_d), E_q by 20 samples (the paper's protocol); "IS": the same with the
  importance-sampled log p(d) (--iw-samples), a tighter estimate; "corpus" forms pool the words:
  exp(-sum_d log p(d) / sum_d N_d). One empty test document (a line with only its label) is left out.
* LDA (sklearn LatentDirichletAllocation, batch variational Bayes, --lda-iter iterations, priors 1/T): "sklearn"
  is ``lda.perplexity(X_test)``, exp(-bound / words) with sklearn's own variational bound (its doc-topic posterior
  fitted on the test documents themselves, plus the topic-word KL term): a corpus perplexity, comparable to our
  corpus forms; "plug-in" uses point estimates log p(d) ~ sum_w c_w log(theta_d . phi_w) with theta_d from
  ``transform``: not a bound (optimistic).

Paper (table 1a, 20News, vocabulary 2,000): NVDM-50 836, NVDM-200 852, LDA-50 1091, LDA-200 1058, docNADE 896.
Run in the background with one thread:

  nohup .venv/bin/python benchmarks/bench_nvdm.py --data-dir /work/shared/data/20news --workdir /tmp/bench-nvdm \
      > /tmp/bench-nvdm.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common as common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

PAPER = {"NVDM-50": 836, "NVDM-200": 852, "LDA-50": 1091, "LDA-200": 1058, "docNADE": 896}


def run_nvdm(name: str, latent_dim: int, updates: str, activation: str, args) -> dict:
    from elbolab import pipeline, topics

    out = Path(args.workdir) / f"nvdm{latent_dim}-{updates}-{activation}"
    started = time.perf_counter()
    pipeline.train("nvdm", "20news", out=out, overwrite=True, data_dir=args.data_dir, latent_dim=latent_dim,
                   updates=updates, activation=activation, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, seed=0, progress=True, tensorboard=False, figures=True)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    result = pipeline.evaluate(out, k=args.iw_samples, refresh_report=True)
    eval_s = time.perf_counter() - started
    metrics = result["model_metrics"]
    shown = [w for w in ("weapon", "medical", "israel", "book", "define") if w in topics.load_topic_model(out)[1]]
    print(topics.neighbours(out, shown, n=5), flush=True)
    return {"name": name, "updates": updates, "activation": activation, "epochs": args.epochs, "train_s": train_s,
            "eval_s": eval_s,
            "test_elbo": result.get("elbo"), "test_log_px": result["log_px"]["mean"], **metrics}


def run_lda(n_topics: int, args) -> dict:
    from sklearn.decomposition import LatentDirichletAllocation

    from elbolab.data.bow import load_20news
    from elbolab.models.nvdm import perplexity

    splits = load_20news(data_dir=args.data_dir, seed=0)
    x_train, x_test = splits.train.x, splits.test.x
    started = time.perf_counter()
    lda = LatentDirichletAllocation(n_components=n_topics, learning_method="batch", max_iter=args.lda_iter,
                                    random_state=0, n_jobs=1)
    lda.fit(x_train)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    sklearn_ppl = float(lda.perplexity(x_test))
    theta = lda.transform(x_test)  # [N, T], rows sum to 1
    phi = lda.components_ / lda.components_.sum(axis=1, keepdims=True)  # [T, V]
    coo = x_test.tocoo()
    word_prob = np.einsum("nt,nt->n", theta[coo.row], phi[:, coo.col].T)  # p(w|d) of each nonzero entry
    log_pd = np.bincount(coo.row, weights=coo.data * np.log(word_prob), minlength=x_test.shape[0])
    plug_in = perplexity(torch.from_numpy(log_pd), torch.from_numpy(np.asarray(x_test.sum(axis=1)).ravel()))
    return {"name": f"LDA-{n_topics}", "train_s": train_s, "eval_s": time.perf_counter() - started,
            "iterations": lda.n_iter_, "sklearn_perplexity": sklearn_ppl, "plug_in_perplexity": plug_in["per_document"],
            "plug_in_corpus_perplexity": plug_in["corpus"]}


def table(results: list[dict]) -> str:
    def fmt(v):
        return "" if v is None else f"{v:.0f}"

    lines = ["| model | paper | ELBO ppl (per doc) | IS ppl (per doc) | ELBO ppl (corpus) | IS ppl (corpus) | "
             "sklearn ppl (corpus) | plug-in ppl (per doc) | train s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = r["name"].split(" ")[0]
        lines.append(f"| {r['name']} | {fmt(PAPER.get(base))} | {fmt(r.get('perplexity_elbo'))} | "
                     f"{fmt(r.get('perplexity_is'))} | {fmt(r.get('corpus_perplexity_elbo'))} | "
                     f"{fmt(r.get('corpus_perplexity_is'))} | {fmt(r.get('sklearn_perplexity'))} | "
                     f"{fmt(r.get('plug_in_perplexity'))} | {r['train_s']:.0f} | {r['eval_s']:.0f} |")
    lines.append(f"| docNADE | {PAPER['docNADE']} | | | | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="/work/shared/data/20news")
    parser.add_argument("--workdir", default="/tmp/bench-nvdm")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--lda-iter", type=int, default=30)
    parser.add_argument("--nvdm", default="50:joint:tanh,50:alternate:tanh,200:joint:tanh",
                        help="K:updates:activation,...")
    parser.add_argument("--lda", default="50,200", help="topic counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not Path(args.data_dir, "train.feat").is_file():
        print(f"no 20news files in {args.data_dir}; nothing to run", file=sys.stderr)
        return 1
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    print(f"# NVDM on 20news, {common.cpu_model()}, torch {torch.__version__}, 1 thread, {vars(args)}", flush=True)
    results = []
    for spec in filter(None, args.nvdm.split(",")):
        k, updates, activation = spec.split(":")
        results.append(run_nvdm(f"NVDM-{k} ({updates}, {activation})", int(k), updates, activation, args))
        print(json.dumps(results[-1]), flush=True)
    for t in filter(None, args.lda.split(",")):
        results.append(run_lda(int(t), args))
        print(json.dumps(results[-1]), flush=True)
    Path(args.workdir, "results.json").write_text(json.dumps(results, indent=1))
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
