"""Trainer: checkpoints, exact resume, divergence handling, run-folder safety."""

import json

import pytest
import torch
from safetensors.torch import load_file

from elbolab import loading, pipeline, runs
from elbolab.config import TrainConfig
from elbolab.errors import CheckpointError, ElbolabError, TrainingDiverged
from elbolab.models import ModelConfig, build_model
from elbolab.models.vae import VAE
from elbolab.trainer import Trainer

FAST = dict(latent_dim=2, hidden=(16,), batch_size=64, progress=False, tensorboard=False, figures=False)


def _weights(run):
    return load_file(str(run / runs.WEIGHTS))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # dynamic binarisation and L = 2 samples exercise every source of randomness the trainer has
    opts = dict(FAST, binarize="dynamic", mc_samples=2, seed=3)
    straight = pipeline.train("vae", "digits", out=tmp_path / "straight", epochs=3, **opts)
    pipeline.train("vae", "digits", out=tmp_path / "resumed", epochs=1, **opts)
    resumed = pipeline.train("vae", "digits", out=tmp_path / "resumed", epochs=3, resume=True, **opts)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (resumed / runs.METRICS).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 1, 2, 2, 3, 3]  # train + val per epoch, no duplicates
    # and the run differs from a run with another seed, so the equality above is not vacuous
    other = pipeline.train("vae", "digits", out=tmp_path / "other", epochs=3, **dict(opts, seed=4))
    assert not torch.equal(_weights(other)["decoder.0.weight"], a["decoder.0.weight"])


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, **FAST)
    model, config = loading.load_run(run)
    fresh = build_model("vae", VAE.config_class.from_dict(config["model_config"]))
    trainer = Trainer(fresh, TrainConfig(**config["train_config"]), tmp_path / "unused", model_name="vae")
    from elbolab.checkpoint import load_checkpoint

    state = load_checkpoint(run / runs.CHECKPOINT, fresh, trainer.optimizers)
    assert state["epoch"] == 1 and state["step"] > 0
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    adam = trainer.optimizers["model"].state_dict()["state"]
    assert len(adam) == len(list(fresh.parameters()))
    assert all(float(s["step"]) == state["step"] for s in adam.values())


def test_existing_run_is_never_overwritten_and_resume_checks_settings(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=1, **FAST)
    before = (run / runs.WEIGHTS).read_bytes()
    with pytest.raises(CheckpointError, match="already holds a run"):
        pipeline.train("vae", "digits", out=run, epochs=1, **FAST)
    with pytest.raises(CheckpointError, match="differs"):
        pipeline.train("vae", "digits", out=run, epochs=2, resume=True, **dict(FAST, latent_dim=3))
    assert (run / runs.WEIGHTS).read_bytes() == before


def test_resume_accepts_a_run_saved_before_an_option_existed(tmp_path):
    """A model option added later (with its default) must not make older runs unresumable: the saved config
    lacks the key, and the run trained with what is now the default."""
    run = pipeline.train("autoencoder", "digits", out=tmp_path / "r", epochs=1, **FAST)
    config = json.loads((run / "config.json").read_text())
    assert config["model_config"].pop("input_dropout") == 0.0
    (run / "config.json").write_text(json.dumps(config))
    pipeline.train("autoencoder", "digits", out=run, epochs=2, resume=True, **FAST)
    records, _ = runs.read_metrics(run / runs.METRICS)
    assert [r["epoch"] for r in records if r.get("split") == "train"] == [1, 2]
    with pytest.raises(CheckpointError, match="input_dropout differs"):  # a non-default value still differs
        pipeline.train("autoencoder", "digits", out=run, epochs=3, resume=True, **dict(FAST, input_dropout=0.2))


class _DivergingVAE(VAE):
    """A VAE whose loss becomes NaN from the given step on."""

    def __init__(self, config, bad_step):
        super().__init__(config)
        self.calls, self.bad_step = 0, bad_step

    def loss(self, batch, ctx):
        self.calls += self.training  # training steps only, not validation batches
        out = super().loss(batch, ctx)
        if self.calls >= self.bad_step:
            out.losses["model"] = out.loss * float("nan")
        return out


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from elbolab.data import load_data

    splits = load_data("digits")
    torch.manual_seed(0)
    steps_per_epoch = -(-len(splits.train) // 64)
    model = _DivergingVAE(ModelConfig(input_dim=64, latent_dim=2, hidden=(16,)), bad_step=steps_per_epoch + 3)
    trainer = Trainer(model, TrainConfig(epochs=3, batch_size=64, progress=False, tensorboard=False),
                      tmp_path / "r", model_name="vae")
    with pytest.raises(TrainingDiverged, match=f"epoch 2, step {steps_per_epoch + 3}"):
        trainer.fit(splits.train, splits.val)
    saved, meta = runs.load_tensors(tmp_path / "r" / runs.CHECKPOINT)
    assert meta["trainer"]["epoch"] == 1
    # the checkpoint holds finite weights from the end of epoch 1, not the NaN step
    assert all(torch.isfinite(v).all() for k, v in saved.items() if k.startswith("model."))


def test_bad_settings_give_clear_errors(tmp_path):
    with pytest.raises(ElbolabError, match="learning rate"):
        TrainConfig(lr=-1)
    with pytest.raises(ElbolabError, match="mc_samples"):
        TrainConfig(mc_samples=0)
    with pytest.raises(ElbolabError, match="latent_dim"):
        ModelConfig(input_dim=4, latent_dim=0)
    with pytest.raises(ElbolabError, match="likelihood"):
        ModelConfig(input_dim=4, likelihood="poisson")
    with pytest.raises(ElbolabError, match="bernoulli likelihood needs data in"):
        import numpy as np

        np.save(tmp_path / "wide.npy", np.linspace(-5, 5, 400, dtype="float32").reshape(100, 4))
        pipeline.train("vae", str(tmp_path / "wide.npy"), out=tmp_path / "w", epochs=1, **FAST)


def test_kl_warmup_schedule():
    from elbolab.config import beta_schedule
    from elbolab.schedules import Schedule

    beta = Schedule.parse(TrainConfig(schedules={"beta": beta_schedule(2.0, 4)}).schedule_specs()["beta"])
    assert [beta(e) for e in (0, 1, 2, 4, 10)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert Schedule.parse(TrainConfig(schedules={"beta": beta_schedule(0.5)}).schedule_specs()["beta"])(0) == 0.5
    assert Schedule.parse(beta_schedule(None, 2, default=4.0))(1) == 2.0  # warm-up to the model's own beta


def test_a_config_json_of_the_earlier_form_is_upgraded_to_one_beta_schedule():
    from elbolab.config import upgrade_run_config

    old = {"model": "beta-vae", "model_config": {"latent_dim": 2, "beta": 6.0},
           "train_config": {"beta": None, "kl_warmup_epochs": 3.0, "schedules": {}}}
    new = upgrade_run_config(old)
    assert new["model_config"] == {"latent_dim": 2}
    assert new["train_config"] == {"schedules": {"beta": "linear:0:6.0:3.0"}}
    vae = {"model": "vae", "model_config": {}, "train_config": {"beta": 2.0, "kl_warmup_epochs": 0.0,
                                                                "schedules": {"free_bits": "constant:0.5"}}}
    assert upgrade_run_config(vae)["train_config"]["schedules"] == {"free_bits": "constant:0.5", "beta": "constant:2.0"}
    current = {"model": "vae", "model_config": {}, "train_config": {"schedules": {}}}
    assert upgrade_run_config(current) is current


def test_training_improves_the_elbo_on_digits(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "r", epochs=15, **dict(FAST, hidden=(64,), lr=3e-3))
    records = [json.loads(x) for x in (run / runs.METRICS).read_text().splitlines()]
    val = [r["elbo"] for r in records if r["split"] == "val"]
    assert val[-1] > val[0] + 2.0  # nats: learning happened
    assert all(abs(r["elbo"] - (r["recon"] - r["kl"])) < 1e-3 for r in records)


def test_the_geometric_schedule_is_the_iwae_papers_learning_rate():
    from elbolab.schedules import Schedule

    lr = Schedule.parse("geometric:0.001:0.7196857:1:3", "lr")
    ends = [1, 4, 13, 40, 121, 364, 1093, 3280]  # stage i lasts 3^i epochs: sum_{j<=i} 3^j
    for i, end in enumerate(ends):
        expected = 1e-3 * 10 ** (-i / 7)
        assert lr(end - 1e-9) == pytest.approx(expected, rel=1e-6)
        assert lr(end) == pytest.approx(1e-3 * 10 ** (-(i + 1) / 7), rel=1e-6)
    with pytest.raises(ElbolabError, match="growth >= 1"):
        Schedule.parse("geometric:0.001:0.7:1:0.5", "lr")


def test_adams_betas_reach_every_optimiser_and_are_checked(tmp_path):
    from elbolab.models import ModelConfig, build_model

    model = build_model("vae", ModelConfig(input_dim=8, latent_dim=2, hidden=(4,)))
    trainer = Trainer(model, TrainConfig(adam_beta1=0.99, progress=False, tensorboard=False), tmp_path / "r",
                      model_name="vae")
    assert trainer.optimizers["model"].param_groups[0]["betas"] == (0.99, 0.999)
    with pytest.raises(ElbolabError, match="adam_beta1 < 1"):
        TrainConfig(adam_beta1=1.0)


def test_compile_falls_back_to_eager_when_compiling_fails_and_trains_the_same_run(tmp_path, monkeypatch, capsys):
    def failing_compile(module, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler here\nmore detail")
        return call

    eager = pipeline.train("vae", "digits", out=tmp_path / "eager", epochs=2, **FAST)
    monkeypatch.setattr(torch, "compile", failing_compile)
    fallback = pipeline.train("vae", "digits", out=tmp_path / "fallback", epochs=2, compile=True,
                              **dict(FAST, progress=True))
    out = capsys.readouterr().out
    assert "--compile: torch.compile failed (RuntimeError: no C++ compiler here); training eagerly" in out
    assert "measured no faster than eager for vae" in out  # vae's compiles_faster is False
    assert json.loads((fallback / "config.json").read_text())["train_config"]["compile"] is True
    a, b = _weights(eager), _weights(fallback)
    assert all(torch.equal(a[key], b[key]) for key in a)  # the failed attempt drew nothing and changed nothing


@pytest.mark.skipif(__import__("shutil").which("c++") is None and __import__("shutil").which("g++") is None,
                    reason="torch.compile (inductor on CPU) needs a C++ compiler")
def test_compile_trains_a_model_measured_faster_compiled(tmp_path, capsys):
    fast = {k: v for k, v in FAST.items() if k not in ("latent_dim", "hidden")}
    run = pipeline.train("hvae", "digits", out=tmp_path / "run", epochs=1, compile=True, train_size=256,
                         **dict(fast, progress=True))
    out = capsys.readouterr().out
    assert "--compile: compiled in" in out and "measured no faster" not in out
    record = [json.loads(x) for x in (run / runs.METRICS).read_text().splitlines()][0]
    assert record["split"] == "train" and -1e4 < record["elbo"] < 0
