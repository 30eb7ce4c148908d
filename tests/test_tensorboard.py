"""TensorBoard logs: scalars on the optimiser step of metrics.jsonl, images every epoch, hyper-parameters with the
final metrics; writing them changes nothing in training."""

import json

import pytest
import torch

from elbolab import pipeline, runs

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

OPTIONS = dict(epochs=3, latent_dim=2, hidden=(32,), batch_size=64, progress=False, figures=False)


def _events(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.IMAGES: 0,
                                                                        event_accumulator.SCALARS: 0})
    return acc.Reload()


def test_scalars_images_and_hparams(tmp_path):
    run = pipeline.train("vae", "digits", out=tmp_path / "tb", tensorboard=True, **OPTIONS)
    records, _ = runs.read_metrics(run / runs.METRICS)
    acc = _events(run / "tensorboard")
    tags = acc.Tags()
    for split in ("train", "val"):
        logged = [(e.step, e.value) for e in acc.Scalars(f"{split}/elbo")]
        expected = [(r["step"], r["elbo"]) for r in records if r["split"] == split]
        assert [s for s, _ in logged] == [s for s, _ in expected]  # the x-axis of metrics.jsonl: optimiser steps
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    steps = sorted({r["step"] for r in records})
    for tag in ("samples", "reconstructions (original | reconstruction)"):
        assert tag in tags["images"]
        images = acc.Images(tag)
        assert [e.step for e in images] == steps  # one grid per epoch
        assert images[0].width > 8 and images[0].height > 8
    hparams = _events(run / "tensorboard" / "hparams")
    plugin = hparams.PluginTagToContent("hparams")
    assert plugin  # the HPARAMS tab's session data
    content = b"".join(plugin.values())
    assert b"model.latent_dim" in content and b"final/val/elbo" in content


def test_logging_leaves_the_trajectory_unchanged(tmp_path):
    with_tb = pipeline.train("vae", "digits", out=tmp_path / "a", tensorboard=True, **OPTIONS)
    without = pipeline.train("vae", "digits", out=tmp_path / "b", tensorboard=False, **OPTIONS)
    a, _ = runs.load_tensors(with_tb / runs.WEIGHTS)
    b, _ = runs.load_tensors(without / runs.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((with_tb / runs.CONFIG).read_text())
    assert config["train_config"]["tensorboard"] is True
