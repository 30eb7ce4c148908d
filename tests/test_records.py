"""The evaluation record's schema: records of today's version round-trip, records written before the schema (main at
d56646d, kept in tests/data) load with every number in place, and a damaged record never breaks a reader."""

import json
from pathlib import Path

import pytest

from elbolab.records import SCHEMA_VERSION, Comparison, Estimate, Evaluation

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["eval_vae_d56646d.json", "eval_hvae_d56646d.json"])
def test_a_record_written_before_the_schema_loads_with_every_value(name):
    raw = json.loads((DATA / name).read_text())
    assert "schema_version" not in raw  # written by d56646d
    ev = Evaluation.from_dict(raw)
    assert ev.schema_version == SCHEMA_VERSION and not ev.other
    assert isinstance(ev.log_px, Estimate) and ev.log_px.mean == raw["log_px"]["mean"]
    assert ev.log_px.k == raw["log_px"]["k"] and ev.log_px.ess_min == raw["log_px"]["ess_min"]
    assert ev.elbo == raw["elbo"] and ev.split == raw["split"] and ev.latent_dim == raw["latent_dim"]
    again = ev.to_dict()
    assert again["schema_version"] == SCHEMA_VERSION
    for key, value in raw.items():  # nothing lost: every value of the old file is in the new form
        if isinstance(value, dict):
            assert {k: v for k, v in value.items() if v is not None} == {k: v for k, v in again[key].items()}, key
        else:
            assert again[key] == value, key


def test_the_oldest_flat_and_top_level_forms_are_upgraded():
    ev = Evaluation.from_dict({"log_px_mean": -90.0, "log_px_mc_stderr": 0.1, "ess_mean": 12.0, "k": 500,
                               "naive_log_px": {"mean": -95.0, "stderr": 1.0}})
    assert ev.log_px == Estimate(mean=-90.0, mc_stderr=0.1, ess_mean=12.0, k=500)
    assert ev.log_px_naive == Estimate(mean=-95.0, stderr_over_examples=1.0)
    ev = Evaluation.from_dict({"log_px": {"mean": -90.0}, "ess_mean": 12.0, "k": 500})
    assert ev.log_px.ess_mean == 12.0 and ev.log_px.k == 500 and not ev.other


def test_damaged_values_and_unknown_keys_are_kept_aside_not_fatal():
    ev = Evaluation.from_dict({"schema_version": 2, "elbo": "high", "log_px": [1, 2], "compare": {"mean_difference":
                               0.5, "stderr": "n/a"}, "kl_per_dim": [0.1, "x"], "from_a_newer_version": 3})
    assert ev.elbo is None and ev.log_px is None and ev.kl_per_dim is None
    assert ev.compare == Comparison(mean_difference=0.5)
    assert ev.other == {"elbo": "high", "log_px": [1, 2], "compare": {"stderr": "n/a"}, "kl_per_dim": [0.1, "x"],
                        "from_a_newer_version": 3}
    assert Evaluation.from_dict("not a dict").log_px is None  # an eval.json holding a list or a string


def test_the_report_renders_an_old_record(tmp_path):
    from elbolab.report import write_report

    run = tmp_path / "run"
    (run / "evaluations").mkdir(parents=True)
    (run / "evaluations" / "test-K50.json").write_text((DATA / "eval_vae_d56646d.json").read_text())
    page = write_report(run).read_text()
    raw = json.loads((DATA / "eval_vae_d56646d.json").read_text())
    assert f"{raw['log_px']['mean']:.3f} ± {raw['log_px']['mc_stderr']:.3f}" in page
    assert "Naive estimator" in page and "Other values" not in page and "38.0 of K = 50" in page


def test_every_key_the_evaluator_writes_is_in_the_schema(tmp_path):
    from elbolab import pipeline

    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, hidden=(16,), latent_dim=2, progress=False,
                         tensorboard=False, figures=False)
    other = pipeline.train("vae", "digits", out=tmp_path / "o", epochs=1, hidden=(16,), latent_dim=2, lr=2e-3,
                           progress=False, tensorboard=False, figures=False)
    result = pipeline.evaluate(run, k=10, naive_k=5, limit=20, compare=other, refresh_report=False)
    written = json.loads(Path(result["saved_to"]).read_text())
    assert written["schema_version"] == SCHEMA_VERSION
    assert Evaluation.from_dict(written).other == {}
