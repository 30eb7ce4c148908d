"""The report's latent explorer: the JavaScript forward pass embedded in the page, run with node, against the
PyTorch decoder's ``decode_mean``; the models it refuses; the report's Explorer section."""

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from elbolab import loading, pipeline
from elbolab.explorer import ExplorerUnavailable, decoder_spec, explorer_html
from elbolab.models import get_model_class
from elbolab.report import write_report

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed: the page's JavaScript "
                                                     "decoder cannot be run outside a browser here")
SHAPE = (1, 4, 5)
D = 20


def make_model(activation="relu", likelihood="bernoulli", latent_dim=2, hidden=(16, 12), seed=0):
    torch.manual_seed(seed)
    cls = get_model_class("vae")
    config = cls.config_class(input_dim=D, latent_dim=latent_dim, hidden=hidden, activation=activation,
                              likelihood=likelihood, image_shape=SHAPE)
    model = cls(config).eval()
    with torch.no_grad():  # larger weights than the default init: the nonlinearities' whole range is used
        for p in model.decoder.parameters():
            p.mul_(3.0)
    return model


def page_parts(page: str) -> tuple[dict, str]:
    """(the JSON data, the core script) embedded in the explorer's HTML."""
    data = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.S).group(1)
    core = re.search(r'<script id="explorer-core">(.*?)</script>', page, re.S).group(1)
    return json.loads(data), core


def run_node(core: str, spec: dict, points: list[list[float]]) -> torch.Tensor:
    script = (core + f"\nvar D=elbolabDecoder({json.dumps(spec)});var P={json.dumps(points)};"
              "process.stdout.write(JSON.stringify(P.map(function(z){return Array.from(D.decode(z));})));")
    done = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return torch.tensor(json.loads(done.stdout), dtype=torch.float64)


POINTS = [[0.0, 0.0], [1.5, -2.0], [-3.0, 3.0], [0.3, 0.7], [6.0, -5.5]]


@needs_node
@pytest.mark.parametrize("activation,likelihood", [
    ("relu", "bernoulli"), ("tanh", "gaussian"), ("elu", "continuous-bernoulli"), ("softplus", "gaussian-decoder"),
    ("gelu", "gaussian-learned"),
])
def test_page_decoder_matches_pytorch_decode_mean(activation, likelihood):
    model = make_model(activation, likelihood)
    spec, core = page_parts(explorer_html(model))
    got = run_node(core, spec, POINTS)
    with torch.no_grad():
        want = model.decode_mean(torch.tensor(POINTS)).double()  # [5, D]
    assert got.shape == want.shape == (len(POINTS), D)
    assert (got - want).abs().max().item() < 1e-5
    assert want.std(0).max() > 0.05  # the points decode to different pictures: the comparison is not trivial


@needs_node
def test_continuous_bernoulli_mean_in_and_outside_the_taylor_region():
    """Logits near 0 (torch's Taylor branch, |lambda - 1/2| <= 1e-3) and far out (clamped lambda) decode as torch."""
    model = make_model("relu", "continuous-bernoulli")
    last = model.decoder[-1]
    logits = torch.tensor([-40.0, -12.0, -0.004, -0.003, -1e-4, 0.0, 2e-4, 0.0039, 0.0041, 0.02, 3.0, 40.0] + [0.5] * 8)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(logits)
    spec, core = page_parts(explorer_html(model))
    got = run_node(core, spec, [[0.0, 0.0]])
    with torch.no_grad():
        want = model.decode_mean(torch.zeros(1, 2)).double()
    assert (got - want).abs().max().item() < 1e-6


@needs_node
def test_a_higher_dimensional_latent_decodes_every_dimension():
    model = make_model("relu", "bernoulli", latent_dim=5)
    spec, core = page_parts(explorer_html(model))
    points = [[0.1, -0.5, 2.0, -1.0, 0.4], [-2.0, 1.0, 0.0, 3.0, -0.2]]
    got = run_node(core, spec, points)
    with torch.no_grad():
        want = model.decode_mean(torch.tensor(points)).double()
    assert (got - want).abs().max().item() < 1e-5
    assert spec["latent_dim"] == 5 and len(spec["low"]) == 5


def test_models_that_do_not_qualify_are_refused_with_a_reason():
    with pytest.raises(ExplorerUnavailable, match="not an MLP"):
        cls = get_model_class("vae")
        decoder_spec(cls(cls.config_class(input_dim=64, latent_dim=2, architecture="conv", image_shape=(1, 8, 8))))
    model = make_model(hidden=(16, 12))
    n_params = 2 * 12 + 12 + 12 * 16 + 16 + 16 * D + D
    assert decoder_spec(model)["n_params"] == n_params  # counted independently from the layer sizes
    assert decoder_spec(model, max_parameters=n_params)["n_params"] == n_params
    with pytest.raises(ExplorerUnavailable, match=f"{n_params:,} parameters"):
        decoder_spec(model, max_parameters=n_params - 1)

    class OwnMean(type(model)):
        def decode_mean(self, z, batch=None):
            return super().decode_mean(z, batch) * 0.5

    with pytest.raises(ExplorerUnavailable, match="its own way"):
        decoder_spec(OwnMean(model.config))


def test_gaussian_decoder_embeds_only_the_mean_rows():
    model = make_model("relu", "gaussian-decoder")
    spec = decoder_spec(model)
    assert model.decoder[-1].out_features == 2 * D and spec["layers"][-1]["n_out"] == D


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("explorer") / "run"
    pipeline.train("vae", "digits", out=out, epochs=1, latent_dim=2, hidden=(32,), train_size=200,
                   progress=False, tensorboard=False, figures=False)
    return out


def test_report_has_an_explorer_for_an_mlp_vae(tiny_run):
    page = write_report(tiny_run).read_text(encoding="utf-8")
    assert '<section id="explorer"><h2>Explorer</h2>' in page and 'id="explorer-plane"' in page
    spec, _ = page_parts(page)
    from elbolab.loading import load_run

    model, config = load_run(tiny_run)
    test = loading.load_run_data(config["data"]).test
    n = min(len(test), 1000)
    assert spec["n_points"] == n and len(spec["labels"]) == n
    with torch.no_grad():
        z = model.latent_means(test.batch(torch.arange(n), torch.Generator()))["z"]
    points = np.frombuffer(base64.b64decode(spec["points"]), dtype="<f4").reshape(n, 2)
    assert np.abs(points - z.numpy()).max() < 1e-6  # the dots are the test codes
    assert "http://" not in page and "https://" not in page


def test_report_notes_a_run_whose_weights_do_not_load(tiny_run, tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(tiny_run, run)
    (run / "model.safetensors").write_bytes(b"not weights")
    page = write_report(run).read_text(encoding="utf-8")
    assert "The interactive explorer could not load the model" in page and 'id="explorer-plane"' not in page
    assert ">Figures</h2>" in page  # the rest of the page is there


def test_report_notes_a_decoder_above_the_size_limit(tiny_run, tmp_path, monkeypatch):
    import elbolab.explorer

    monkeypatch.setattr(elbolab.explorer, "MAX_DECODER_PARAMETERS", 10)
    page = write_report(tiny_run).read_text(encoding="utf-8")
    assert "No interactive explorer for this run" in page and "more than the 10 the page embeds" in page
    assert 'id="explorer-plane"' not in page


def test_the_plane_shows_the_two_widest_dimensions_lower_index_across():
    """The plane spans the two latent dimensions whose encoded points spread most, the lower index on the
    horizontal axis (as in the manifold and scatter figures)."""
    from elbolab.data.core import TensorData

    model = make_model("relu", "bernoulli", latent_dim=4)
    x = torch.rand(200, D, generator=torch.Generator().manual_seed(2)).round()
    means = model.latent_means(x)["z"].detach()
    widest = sorted(int(i) for i in means.std(0).argsort(descending=True)[:2])
    spec, _ = page_parts(explorer_html(model, TensorData(x, None, SHAPE, "none", "toy/test")))
    assert spec["dims"] == widest
