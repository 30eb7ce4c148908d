"""NVDM's nearest words (Miao, Yu & Blunsom 2016) on 20 Newsgroups, next to the table the project's notes reproduce.

Reference: /work/shared/notes/004_e73e17ee4c7eee9a.txt, section "Manifold Embedding, or similarity of learned semantic
vector, R", the table "(b) The five nearest words in the semantic space", row "NVDM" (the notes cite Miao, Yu &
Blunsom, "Neural variational inference for text processing", ICML 2016). The column below is transcribed from those
notes, five words per probe word, nearest first; the paper's PDF itself was not read.

Ours: elbolab's ``nvdm`` trained on the protocol of benchmarks/bench_nvdm.py for NVDM-50 (20news from
/work/shared/data/20news, 10,259 training documents and 1,000 held out by seed 0, encoder 500 units tanh, K = 50,
joint updates, Adam lr 5e-4, batch 64, 60 epochs, seed 0, fp32, one thread), then the top-10 nearest words of each
probe word by the cosine similarity of the decoder's word vectors (the columns of R), as ``elbolab neighbours RUN
word -n 10`` prints them (``elbolab.topics.nearest_words``). The vocabulary is lemmatised ("weapon", not "weapons"):
a probe word is looked up as ``elbolab.topics.lemma_in`` maps it, and the notes' words are compared both as written
and mapped the same way (a notes word that maps to the probe word itself, e.g. "books" for "book", cannot be a
neighbour here; one not in the 1,995-word vocabulary at all cannot either). Overlap per word: how many of the notes'
five are among our top 5 and our top 10.

The run folder (weights) is /work/runs/nvdm_neighbours/nvdm50 (outside the repository); a finished run is reused, a
partial one resumed; --run RUN uses another finished nvdm run instead. Writes
benchmarks/reproduce/results/nvdm_neighbours.json (with the markdown table under "markdown_table"; --table prints it
from that file without loading anything else).

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce/nvdm_neighbours.py
  .venv/bin/python benchmarks/reproduce/nvdm_neighbours.py --table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from chunked import cpu_model, log

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUN_DEFAULT = Path("/work/runs/nvdm_neighbours/nvdm50")
NOTES = ("/work/shared/notes/004_e73e17ee4c7eee9a.txt, section 'Manifold Embedding, or similarity of learned "
         "semantic vector, R', table '(b) The five nearest words in the semantic space', row NVDM (Miao, Yu & "
         "Blunsom 2016)")
# transcribed from the notes' table (row NVDM), nearest first
NOTES_NVDM = {
    "weapons": ["guns", "weapon", "gun", "militia", "armed"],
    "medical": ["medicine", "health", "treatment", "disease", "patients"],
    "companies": ["expensive", "industry", "company", "market", "buy"],
    "define": ["defined", "definition", "printf", "int", "sufficient"],
    "israel": ["israeli", "arab", "arabs", "lebanon", "lebanese"],
    "book": ["books", "reference", "guide", "writing", "pages"],
}
# bench_nvdm.py's NVDM-50 protocol
PROTOCOL = dict(latent_dim=50, updates="joint", activation="tanh", epochs=60, batch_size=64, lr=5e-4, seed=0)


def epochs_done(run: Path) -> int:
    from elbolab import runs

    records, _ = runs.read_metrics(run / "metrics.jsonl")
    return max((r["epoch"] for r in records if r.get("split") == "train" and isinstance(r.get("epoch"), int)),
               default=0)


def train_seconds(run: Path) -> float:
    from elbolab import runs

    records, _ = runs.read_metrics(run / "metrics.jsonl")
    return round(sum(r.get("seconds", 0.0) for r in records if r.get("split") == "train"), 1)


def ensure_run(run: Path, data_dir: str) -> dict:
    """Train (or finish) the NVDM-50 run; returns what happened."""
    from elbolab import pipeline

    done = epochs_done(run) if (run / "metrics.jsonl").is_file() else 0
    if done >= PROTOCOL["epochs"] and (run / "model.safetensors").is_file():
        log(f"{run}: {done} epochs already trained; reused")
        return {"trained_now": False}  # the training session's record is kept from the previous result file
    resume = done > 0 and (run / "checkpoint.safetensors").is_file()
    started = time.perf_counter()
    log(f"{run}: training ({'resuming at epoch ' + str(done) if resume else 'new run'}); load "
        f"{os.getloadavg()[0]:.2f}")
    if resume:
        pipeline.train(out=run, resume=True, epochs=PROTOCOL["epochs"], progress=False, tensorboard=False,
                       figures=False)
    else:
        pipeline.train("nvdm", "20news", out=run, overwrite=True, data_dir=data_dir, progress=False,
                       tensorboard=False, figures=False, **PROTOCOL)
    return {"trained_now": True, "session_wall_seconds": round(time.perf_counter() - started, 1),
            "load_at_end": round(os.getloadavg()[0], 2)}


def compare(run: Path, n: int) -> list[dict]:
    from elbolab.topics import lemma_in, load_topic_model, nearest_words

    model, vocabulary = load_topic_model(run)
    index = set(vocabulary)
    rows = []
    for probe, theirs in NOTES_NVDM.items():
        query = lemma_in(probe, index)
        ours = nearest_words(model, vocabulary, probe, n)
        our_words = [w for w, _ in ours]
        mapped = [lemma_in(w, index) for w in theirs]
        status = []
        for m in mapped:
            if m == query:
                status.append("the probe word itself in this vocabulary")
            elif m not in index:
                status.append("not in the vocabulary")
            elif m in our_words:
                status.append(f"ours #{our_words.index(m) + 1}")
            else:
                status.append(f"not in our top {n}")
        rows.append({
            "probe": probe, "looked_up_as": query, "ours": [{"word": w, "cosine": round(s, 4)} for w, s in ours],
            "notes_nvdm": theirs, "notes_mapped_to_vocabulary": mapped, "notes_word_status": status,
            "overlap_top5_as_written": len(set(theirs) & set(our_words[:5])),
            "overlap_top10_as_written": len(set(theirs) & set(our_words[:10])),
            "overlap_top5_lemmatised": len({m for m in mapped if m != query} & set(our_words[:5])),
            "overlap_top10_lemmatised": len({m for m in mapped if m != query} & set(our_words[:10])),
            "notes_words_comparable": len({m for m in mapped if m != query and m in index}),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| probe (looked up as) | ours: top 10 by cosine of the decoder's word vectors, nearest first | "
             "notes 004, NVDM (five nearest) | overlap: notes' 5 in our top 5 / top 10 (lemmatised; as written) |",
             "|---|---|---|---|"]
    for r in rows:
        ours = ", ".join(f"{o['word']}" for o in r["ours"])
        theirs = ", ".join(w if w == m else f"{w} (-> {m})"
                           for w, m in zip(r["notes_nvdm"], r["notes_mapped_to_vocabulary"]))
        probe = r["probe"] if r["probe"] == r["looked_up_as"] else f"{r['probe']} ({r['looked_up_as']})"
        lines.append(f"| {probe} | {ours} | {theirs} | {r['overlap_top5_lemmatised']} / "
                     f"{r['overlap_top10_lemmatised']} of {r['notes_words_comparable']} comparable "
                     f"({r['overlap_top5_as_written']} / {r['overlap_top10_as_written']} as written) |")
    t5 = sum(r["overlap_top5_lemmatised"] for r in rows)
    t10 = sum(r["overlap_top10_lemmatised"] for r in rows)
    comparable = sum(r["notes_words_comparable"] for r in rows)
    lines.append(f"| all six | | | {t5} / {t10} of {comparable} comparable |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(RUN_DEFAULT), help="the nvdm run folder (trained here when unfinished)")
    p.add_argument("--data-dir", default="/work/shared/data/20news")
    p.add_argument("-n", type=int, default=10, help="our nearest words per probe word")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--table", action="store_true", help="print the markdown table from the result file and exit")
    args = p.parse_args(argv)
    out = Path(args.results_dir)
    previous = json.loads((out / "nvdm_neighbours.json").read_text()) if (out / "nvdm_neighbours.json").is_file() \
        else {}
    if args.table:
        print(previous.get("markdown_table", "no result file yet"))
        return 0
    torch.set_num_threads(1)
    run = Path(args.run)
    run.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = round(os.getloadavg()[0], 2)
    training = ensure_run(run, args.data_dir)
    if not training["trained_now"] and previous.get("ours", {}).get("run_dir") == str(run):
        old = previous["ours"]  # (a file of the first version kept these keys at the top level of "ours")
        training = old.get("training_session") or {k: old[k] for k in ("trained_now", "session_wall_seconds",
                                                                       "load_at_start", "load_at_end") if k in old}
    elif training["trained_now"]:
        training["load_at_start"] = load_start
    rows = compare(run, args.n)
    config = json.loads((run / "config.json").read_text())
    result = {
        "reference": {"source": NOTES, "nvdm_five_nearest": NOTES_NVDM,
                      "verified": "transcribed from the notes; the paper's PDF was not read"},
        "ours": {"run_dir": str(run), "protocol": "benchmarks/bench_nvdm.py's NVDM-50: " + json.dumps(PROTOCOL)
                 + "; 20news from /work/shared/data/20news, 1,000 training documents held out (seed 0)",
                 "model_config": {k: config.get("model_config", {}).get(k) for k in
                                  ("latent_dim", "hidden", "activation", "updates")},
                 "train_config": {k: config.get("train_config", {}).get(k) for k in
                                  ("epochs", "batch_size", "lr", "seed", "precision")},
                 "epochs_trained": epochs_done(run), "train_seconds": train_seconds(run),
                 "training_session": training,
                 "neighbours": f"cosine similarity of the decoder's word vectors (elbolab neighbours RUN WORD -n "
                               f"{args.n})", "cpu": cpu_model(), "torch_threads": 1,
                 "load_at_start": load_start, "wall_seconds": round(time.time() - started, 1)},
        "words": rows,
        "overlap_total_top5_lemmatised": sum(r["overlap_top5_lemmatised"] for r in rows),
        "overlap_total_top10_lemmatised": sum(r["overlap_top10_lemmatised"] for r in rows),
        "notes_words_comparable": sum(r["notes_words_comparable"] for r in rows),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce/nvdm_neighbours.py",
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    table = markdown(rows)
    result["markdown_table"] = table
    out.mkdir(parents=True, exist_ok=True)
    (out / "nvdm_neighbours.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
