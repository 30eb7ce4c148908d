"""The command line's manners: it starts fast (no torch or scikit-learn for --help, -h, --version), never replaces
earlier results without --overwrite, refuses an --out of the wrong kind before any work, and turns bad input
(binary bytes in a CSV, sizes that cannot fit in memory, data the VB prior cannot use) into one line and exit 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

import elbolab
from elbolab import outputs
from elbolab.cli import main

HEAVY = ("torch", "sklearn", "numpy", "matplotlib", "scipy")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args, expected=()):
    """Exit 2 with exactly one 'error: ...' line on stderr holding every string of ``expected``; returns it."""
    code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def little_memory(monkeypatch):
    """8 GB available, whatever the machine has: the memory refusals are then the same everywhere."""
    monkeypatch.setattr(outputs, "available_memory", lambda: 8 * 10**9)


# ------------------------------------------------------------------------------------------------- start-up
def test_cli_import_and_help_do_not_import_torch_or_sklearn():
    code = (
        "import sys\n"
        "import elbolab.cli\n"
        f"heavy = {HEAVY!r}\n"
        "print('loaded:', sorted(m for m in heavy if m in sys.modules))\n"
        "from elbolab.cli import main\n"
        "for args in (['--help'], ['-h'], ['--version'], ['models'], ['train', '--help'], ['eval', '-h'],\n"
        "             ['sample', '--help'], ['gmm', 'fit', '--help'], ['denoise', '--help'],\n"
        "             ['functional', 'shortest-curve', '-h']):\n"
        "    assert main(args) == 0, args\n"
        "print('loaded:', sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    after_import, after_help = [line for line in result.stdout.splitlines() if line.startswith("loaded: ")]
    assert after_import == "loaded: []", f"import elbolab.cli imported {after_import}"
    assert after_help == "loaded: []", f"--help / models imported {after_help}"


def test_version_and_short_help_from_the_console():
    version = subprocess.run([sys.executable, "-m", "elbolab", "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout == f"elbolab {elbolab.__version__}\n", version
    short = subprocess.run([sys.executable, "-m", "elbolab", "-h"], capture_output=True, text=True, timeout=60)
    assert short.returncode == 0 and short.stdout.startswith("Usage: ") and "-h, --help" in short.stdout
    assert "--version" in short.stdout


def test_short_help_on_every_level(capsys):
    for args in (["-h"], ["train", "-h"], ["gmm", "-h"], ["gmm", "fit", "-h"], ["denoise", "-h"]):
        code, out, _ = run(capsys, *args)
        assert code == 0 and "Usage: " in out and "-h, --help" in out, args
    code, out, _ = run(capsys, "sample", "-h")
    assert "--overwrite" in out and "samples.png" in out
    code, out, _ = run(capsys, "gmm", "fit", "-h")
    assert "--overwrite" in out and "--reg-covar" in out


def test_threads_is_offered_and_a_bad_count_refused_before_any_work(capsys, tmp_path):
    for command in ("train", "eval"):
        code, out, _ = run(capsys, command, "-h")
        assert code == 0 and "--threads" in out and "OMP_NUM_THREADS" in out, command
    refused(capsys, "train", "vae", "--out", tmp_path / "r", "--threads", "0", expected=("--threads N >= 1", "0"))
    assert not (tmp_path / "r").exists()


def test_models_listed_from_source_match_the_registry(capsys):
    from elbolab.cli import _registered_models_from_source
    from elbolab.models import available_models

    listed = _registered_models_from_source()
    registry = {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in available_models().items()
                if cls.__module__.startswith("elbolab.")}  # other test files register models of their own
    assert listed == registry
    code, out, _ = run(capsys, "models")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == list(registry)


def test_gmm_cli_covariance_names_match_the_estimators():
    from elbolab.classical._mixture_common import COVARIANCE_TYPES
    from elbolab.classical.gmm_cli import COVARIANCES

    assert sorted(COVARIANCES) == sorted(COVARIANCE_TYPES)


# ------------------------------------------------------------------------------------------------- gmm fit
@pytest.fixture
def points(tmp_path):
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-3, 1, (60, 2)), rng.normal(3, 1, (60, 2))])
    path = tmp_path / "points.csv"
    np.savetxt(path, X, delimiter=",")
    return path


def test_gmm_fit_never_replaces_a_fit_without_overwrite(points, tmp_path, capsys):
    out = tmp_path / "gmm"
    assert run(capsys, "gmm", "fit", points, "-k", "2", "--out", out)[0] == 0
    before = (out / "params.json").read_text()
    refused(capsys, "gmm", "fit", points, "-k", "3", "--out", out, expected=("params.json", "--overwrite"))
    assert (out / "params.json").read_text() == before
    code, _, err = run(capsys, "gmm", "fit", points, "-k", "3", "--out", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "params.json").read_text())["n_components"] == 3


def test_gmm_fit_refuses_a_file_as_out_folder(points, tmp_path, capsys):
    refused(capsys, "gmm", "fit", points, "-k", "2", "--out", points, expected=("folder", str(points)))
    refused(capsys, "gmm", "fit", points, "-k", "2", "--out", points / "sub", expected=("is a file",))


@pytest.mark.parametrize("content, got", [
    (np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes(), "binary data"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "a PNG image"),
    (b"1,2\n3,\x004\n", "binary data"),
])
def test_gmm_fit_binary_csv_is_one_line(content, got, tmp_path, capsys):
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    refused(capsys, "gmm", "fit", path, "-k", "2", "--out", tmp_path / "o",
            expected=("expected a text CSV file", got, ".npy"))
    assert not (tmp_path / "o").exists()


def test_gmm_fit_reads_a_csv_with_a_byte_order_mark(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "bom.csv"
    path.write_text("\ufeff" + "\n".join(f"{a:.4f},{b:.4f}" for a, b in rng.normal(size=(30, 2))), encoding="utf-8")
    assert run(capsys, "gmm", "fit", path, "-k", "1", "--out", tmp_path / "o")[0] == 0
    assert json.loads((tmp_path / "o" / "params.json").read_text())["n_samples"] == 30  # no row taken as a header


def test_gmm_vb_constant_column_names_what_the_cli_offers(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 3))
    X[:, 1] = 5.0
    path = tmp_path / "const.csv"
    np.savetxt(path, X, delimiter=",")
    line = refused(capsys, "gmm", "fit", path, "-k", "2", "--method", "vb", "--out", tmp_path / "o",
                   expected=("constant column(s) [2]", "--method em", "--covariance spherical"))
    assert "covariance_prior" not in line and "np.cov" not in line
    # what the message offers works
    assert run(capsys, "gmm", "fit", path, "-k", "2", "--method", "vb", "--covariance", "spherical", "--out",
               tmp_path / "s")[0] == 0
    assert run(capsys, "gmm", "fit", path, "-k", "2", "--method", "em", "--out", tmp_path / "e")[0] == 0
    # linearly dependent columns: the full prior is singular, the diagonal one is not
    X = rng.normal(size=(80, 2))
    np.savetxt(path, np.column_stack([X, X.sum(1)]), delimiter=",")
    refused(capsys, "gmm", "fit", path, "-k", "2", "--method", "vb", "--out", tmp_path / "o",
            expected=("linearly dependent", "--covariance diag"))
    assert run(capsys, "gmm", "fit", path, "-k", "2", "--method", "vb", "--covariance", "diag", "--out",
               tmp_path / "d")[0] == 0


def test_gmm_singular_covariance_advice_uses_flags(tmp_path, capsys):
    path = tmp_path / "dup.csv"
    path.write_text("1,2\n1,2\n1,2\n3,4\n3,4\n3,4\n5,5\n")
    line = refused(capsys, "gmm", "fit", path, "-k", "7", "--reg-covar", "0", "--out", tmp_path / "o",
                   expected=("--reg-covar", "-k"))
    assert "raise reg_covar" not in line and "dtype=" not in line
    refused(capsys, "gmm", "fit", path, "-k", "2", "--reg-covar", "-1", "--out", tmp_path / "o",
            expected=("--reg-covar >= 0",))


# ------------------------------------------------------------------------------- denoise, shortest-curve
def test_denoise_refuses_a_size_that_cannot_fit_in_memory(tmp_path, capsys, little_memory):
    out = tmp_path / "big"
    line = refused(capsys, "denoise", "--size", "100000", "--out", out, expected=("--size 100000", "memory"))
    assert "TB" in line and "or less" in line
    assert not out.exists()
    refused(capsys, "denoise", "--size", "5", "--out", out, expected=("--size", "at least 8"))


def test_denoise_and_shortest_curve_never_replace_without_overwrite(tmp_path, capsys):
    out = tmp_path / "ising"
    args = ["denoise", "--size", "16", "--sweeps", "3", "--out", out]
    assert run(capsys, *args)[0] == 0
    before = (out / "result.json").read_text()
    refused(capsys, *args, "--seed", "1", expected=("result.json", "--overwrite"))
    assert (out / "result.json").read_text() == before
    assert run(capsys, *args, "--seed", "1", "--overwrite")[0] == 0
    assert json.loads((out / "result.json").read_text())["seed"] == 1
    # shortest-curve would replace that folder's result.json: refused before any work
    refused(capsys, "functional", "shortest-curve", "--points", "9", "--out", out, expected=("result.json",))
    assert not (out / "iterates.png").exists()
    curve = tmp_path / "curve"
    assert run(capsys, "functional", "shortest-curve", "--points", "9", "--out", curve)[0] == 0
    refused(capsys, "functional", "shortest-curve", "--points", "9", "--out", curve, expected=("--overwrite",))
    assert run(capsys, "functional", "shortest-curve", "--points", "9", "--out", curve, "--overwrite")[0] == 0


def test_denoise_and_shortest_curve_refuse_a_file_as_out(tmp_path, capsys):
    path = tmp_path / "a.png"
    path.write_bytes(b"\x89PNG")
    refused(capsys, "denoise", "--size", "16", "--out", path, expected=("folder",))
    refused(capsys, "functional", "shortest-curve", "--out", path, expected=("folder",))
    assert path.read_bytes() == b"\x89PNG"


# ------------------------------------------------------------------------------------------------- sample
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from elbolab import pipeline

    out = tmp_path_factory.mktemp("manners") / "run"
    pipeline.train("vae", "digits", out=out, epochs=1, latent_dim=2, hidden=(16,), batch_size=256, figures=False,
                   progress=False, tensorboard=False)
    return out


def _snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_sample_writes_where_told_and_never_into_the_run(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tiny_run)
    code, out, err = run(capsys, "sample", tiny_run, "-n", "8")
    assert code == 0, err
    assert out.strip() == "samples.png" and (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert _snapshot(tiny_run) == before
    first = (tmp_path / "samples.png").read_bytes()
    refused(capsys, "sample", tiny_run, "-n", "8", "--seed", "1", expected=("samples.png", "--overwrite"))
    assert (tmp_path / "samples.png").read_bytes() == first
    assert run(capsys, "sample", tiny_run, "-n", "8", "--seed", "1", "--overwrite")[0] == 0
    assert (tmp_path / "samples.png").read_bytes() != first
    assert _snapshot(tiny_run) == before


def test_sample_refuses_an_out_of_the_wrong_kind(tiny_run, tmp_path, capsys):
    refused(capsys, "sample", tiny_run, "--out", tmp_path, expected=("folder", ".png"))
    refused(capsys, "sample", tiny_run, "--out", tmp_path / "grid", expected=(".png",))
    refused(capsys, "sample", tiny_run, "--out", tmp_path / "grid.jpg", expected=(".png",))
    assert list(tmp_path.iterdir()) == []


def test_sample_refuses_what_cannot_fit_in_memory(tiny_run, tmp_path, capsys, little_memory):
    out = tmp_path / "many.png"
    line = refused(capsys, "sample", tiny_run, "-n", "10000000", "--out", out,
                   expected=("-n 10000000", "memory", "or fewer"))
    assert "GB" in line
    assert not out.exists()


def test_available_memory_is_read():
    available = outputs.available_memory()
    assert available is None or available > 10**6
    assert outputs.round_down(12449) == 12000 and outputs.round_down(3318614) == 3300000
    assert outputs.round_down(57) == 57


def test_set_beta_points_to_the_beta_schedule_before_any_work(capsys, tmp_path):
    code, out, err = run(capsys, "train", "beta-vae", "--data", "digits", "--set", "beta=4", "--out", tmp_path / "r")
    assert code == 2 and "use --beta 4" in err and "--schedule beta=" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
