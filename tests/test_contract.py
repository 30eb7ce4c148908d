"""The model contract, for every registered model: a new model file is picked up here with no edit.

Each model trains from tiny data through the Python API (two epochs, figures and report drawn), and then:
its config round-trips through JSON; one loss gives a finite value for every parameter group and the groups hold
every trainable parameter exactly once; ``importance_samples`` has shapes ``[k, B, d]`` and ``[k, B]`` with finite
log weights; the diagnostic hooks are None or ``[B, d_g]``; the saved weights load back to the same tensors and the
same log weights; and a run stopped after one epoch and resumed ends bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_bow_corpus

from elbolab import loading, pipeline, runs
from elbolab.models import available_models
from elbolab.models.base import check_parameter_groups
from elbolab.schedules import StepContext

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(epochs=2, batch_size=32, train_size=96, val_size=32, progress=False, tensorboard=False, seed=3)
HIERARCHY = dict(latent_dims=(4, 2), hidden=(16,))
# A model that needs other data or options than an 8x8-digit MLP with a 2-d latent says so here; every other
# registered model runs with the defaults below.
SETTINGS: dict[str, tuple[str, dict]] = {
    "hvae": ("digits", HIERARCHY),
    "hiwae": ("digits", HIERARCHY),
    "ladder-vae": ("digits", HIERARCHY),
    "ladder-iwae": ("digits", HIERARCHY),
    "nvdm": ("20news", dict(hidden=(16,), latent_dim=2)),
    "cvae": ("digits", dict(hidden=(16,), latent_dim=2)),
    "vade": ("digits", dict(hidden=(16,), latent_dim=2, n_clusters=3)),
}
DEFAULT = ("digits", dict(hidden=(16,), latent_dim=2))
NAMES = sorted(available_models())


def settings(name: str, corpus) -> tuple[str, dict]:
    source, options = SETTINGS.get(name, DEFAULT)
    options = {**TINY, **options}
    if source == "20news":
        options["data_dir"] = corpus
        options.pop("train_size")
        options["val_size"] = 10
    return source, options


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_bow_corpus(tmp_path_factory.mktemp("bow") / "20news")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """name -> run folder, trained on first use."""
    folders = {}

    def get(name):
        if name not in folders:
            source, options = settings(name, corpus)
            folders[name] = pipeline.train(name, source, out=tmp_path_factory.mktemp(name) / "run", **options)
        return folders[name]

    return get


def first_batch(run, n=8):
    model, config = loading.load_run(run)
    data = loading.load_run_data(config["data"]).test
    return model, data.batch(torch.arange(n), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_json(name, trained):
    run = trained(name)
    model, config = loading.load_run(run)
    again = type(model.config).from_dict(json.loads(json.dumps(model.config.to_dict())))
    assert again == model.config
    assert (run / "index.html").is_file() and any((run / runs.FIGURES).glob("*.png"))


@pytest.mark.parametrize("name", NAMES)
def test_one_loss_is_finite_for_every_group_and_groups_partition_the_parameters(name, trained):
    model, batch = first_batch(trained(name), 16)
    model.train()
    groups = model.parameter_groups()
    check_parameter_groups(model, groups)
    seen = [id(p) for params in groups.values() for p in params]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)
    torch.manual_seed(0)
    out = model(batch, StepContext(step=0, epoch=0.0))
    assert set(groups) <= set(out.losses)
    for group in groups:
        loss = out.losses[group]
        assert loss is None or bool(torch.isfinite(loss)), (group, loss)
    assert "elbo" in out.metrics or "loss" in out.losses or "model" in out.losses


@pytest.mark.parametrize("name", NAMES)
def test_importance_samples_and_diagnostic_hooks_have_the_documented_shapes(name, trained):
    model, batch = first_batch(trained(name))
    with torch.no_grad():
        if not model.has_posterior:  # the autoencoder: no q(z|x), so no importance weights, and it says so
            with pytest.raises(NotImplementedError, match="no q"):
                model.importance_samples(batch, 5)
            return
        z, log_w = model.importance_samples(batch, 5)
        assert log_w.shape == (5, len(batch)) and z.shape[:2] == (5, len(batch)) and z.dim() == 3
        assert bool(torch.isfinite(log_w).all())
        for hook in ("latent_means", "kl_terms"):
            groups = getattr(model, hook)(batch)
            if groups is not None:
                for value in groups.values():
                    assert value.dim() == 2 and value.shape[0] == len(batch), (hook, value.shape)


@pytest.mark.parametrize("name", NAMES)
def test_saved_weights_load_back_to_the_same_model(name, trained):
    run = trained(name)
    model, _ = loading.load_run(run)
    saved, _ = runs.load_tensors(run / runs.WEIGHTS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    again, batch = first_batch(run)
    with torch.no_grad():
        first, second = model.latent_means(batch), again.latent_means(batch)
    assert first.keys() == second.keys() and all(torch.equal(first[g], second[g]) for g in first)


@pytest.mark.parametrize("name", NAMES)
def test_a_resumed_run_ends_bit_identical(name, tmp_path, corpus):
    source, options = settings(name, corpus)
    straight = pipeline.train(name, source, out=tmp_path / "straight", figures=False, **options)
    pipeline.train(name, source, out=tmp_path / "stopped", figures=False, **{**options, "epochs": 1})
    resumed = pipeline.train(out=tmp_path / "stopped", resume=True, epochs=2, figures=False)
    a, _ = runs.load_tensors(straight / runs.WEIGHTS)
    b, _ = runs.load_tensors(resumed / runs.WEIGHTS)
    assert a.keys() == b.keys()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, differ
