"""The reports in a real browser: headless Chromium driven over the DevTools protocol (a pipe, no extra package).

Each kind of report (a VAE run with the latent explorer, a `gmm fit` output, a `denoise` output) opens without a
JavaScript error or a failed resource load, fits a phone (390 px) and a desktop (1280 px) width without horizontal
scrolling of the page, and renders; the explorer's picture follows the pointer and equals PyTorch's decoder.

Skips when no Chromium binary is installed (nothing is downloaded). Set ELBOLAB_SCREENSHOTS=folder to keep the
1280 px screenshots (docs/screenshots/ holds the ones the README shows).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
                if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium binary (chromium, chromium-browser or "
                                "google-chrome) on PATH: the reports are not opened in a browser here")


class Browser:
    """Chromium with --remote-debugging-pipe: JSON messages ending in NUL, written to its fd 3, read from fd 4."""

    def __init__(self, binary: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire():  # in the child: fd 3 = what we write, fd 4 = what we read
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-sync", "--mute-audio", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, pass_fds=(3, 4), close_fds=True)  # kept open after wire()
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method and event.get("sessionId") == session:
                return event
            self.events.append(event)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


class Page:
    """One tab at a given viewport width; ``problems()`` lists JavaScript errors and failed loads seen so far."""

    def __init__(self, browser: Browser, url: str, width: int, height: int = 900):
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.target = target
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": width < 600})
        self.call("Page.navigate", {"url": url})
        browser.wait_for("Page.loadEventFired", self.session)

    def call(self, method, params=None):
        return self.browser.send(method, params, self.session)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        self.js("1")  # a round trip: every event the page sent before now has been read
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"exception: {details.get('exception', {}).get('description', details.get('text'))}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.loadingFailed":
                found.append(f"failed load: {params.get('errorText')} ({params.get('type')})")
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if not url.startswith(("file:", "data:", "about:")):
                    found.append(f"fetched from the network: {url}")
        return found

    def screenshot(self) -> bytes:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        return base64.b64decode(data)

    def close(self):
        self.browser.send("Target.closeTarget", {"targetId": self.target})


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    instance = Browser(BROWSER, tmp_path_factory.mktemp("chromium-profile"))
    try:
        instance.send("Browser.getVersion", timeout=30)  # started and listening
        yield instance
    finally:
        instance.close()


def check_layout_and_errors(browser: Browser, page_path: Path, name: str, hash_: str = "") -> bytes:
    """Open the page at 390 and 1280 px: no errors, no horizontal overflow; returns the 1280 px screenshot."""
    url = page_path.resolve().as_uri() + hash_
    shot = b""
    for width in (390, 1280):
        page = Page(browser, url, width)
        try:
            assert page.problems() == [], f"{name} at {width} px"
            # against the device width: a phone's layout viewport (innerWidth) widens to content that overflows
            scroll = page.js("document.documentElement.scrollWidth")
            assert scroll <= width, f"{name} at {width} px: the page is {scroll} px wide"
            if width == 1280:
                shot = page.screenshot()
        finally:
            page.close()
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=float)
    assert image.shape[1] == 1280 and image.std() > 10  # something was drawn, not a blank page
    keep = os.environ.get("ELBOLAB_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(shot)).convert("RGB").save(Path(keep) / f"{name}.png",
                                                                              optimize=True)
    return shot


# ------------------------------------------------------------------------------------------------ VAE run
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    from elbolab import pipeline
    from elbolab.report import write_report

    out = tmp_path_factory.mktemp("browser") / "vae-digits"
    pipeline.train("vae", "digits", out=out, epochs=3, latent_dim=2, hidden=(64,), train_size=600,
                   progress=False, tensorboard=False, figures=True)
    write_report(out)
    return out


def test_vae_report_in_the_browser(browser, vae_run):
    check_layout_and_errors(browser, vae_run / "index.html", "report-vae", "#explorer-test=0.5,-0.5")


def pixels(page: Page) -> np.ndarray:
    """The explorer's decoded picture as the canvas holds it, grey levels [H, W]."""
    flat = page.js("(function(){var c=document.getElementById('explorer-image');"
                   "return Array.from(c.getContext('2d').getImageData(0,0,c.width,c.height).data);})()")
    height, width = page.js("[document.getElementById('explorer-image').height,"
                            "document.getElementById('explorer-image').width]")
    return np.asarray(flat, dtype=float).reshape(height, width, 4)[..., 0]


def test_explorer_picture_follows_the_pointer_and_equals_pytorch(browser, vae_run):
    from elbolab.loading import load_run

    model, _ = load_run(vae_run)
    url = (vae_run / "index.html").resolve().as_uri()
    z_points = [(0.5, -0.5), (-1.5, 1.0)]
    checksums = []
    for z in z_points:
        page = Page(browser, f"{url}#explorer-test={z[0]},{z[1]}", 1280)
        try:
            assert page.problems() == []
            checksums.append(page.js("document.getElementById('explorer-image').dataset.checksum"))
            with torch.no_grad():
                want = model.decode_mean(torch.tensor([z])).reshape(8, 8).numpy() * 255  # grey levels
            assert np.abs(pixels(page) - want).max() <= 1.0  # the page's rounding to 8 bits
        finally:
            page.close()
    assert checksums[0] != checksums[1]

    # A real pointer: move the mouse over two places of the plane; the picture and z follow it.
    page = Page(browser, url, 1280)
    try:
        page.js("document.getElementById('explorer-plane').scrollIntoView()")
        box = page.js("(function(){var r=document.getElementById('explorer-plane').getBoundingClientRect();"
                      "return [r.left,r.top,r.width,r.height];})()")
        seen = []
        for fx, fy in ((0.3, 0.3), (0.75, 0.6)):
            page.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box[0] + fx * box[2],
                                                   "y": box[1] + fy * box[3]})
            seen.append((page.js("document.getElementById('explorer-image').dataset.checksum"),
                         page.js("document.getElementById('explorer-z').textContent"), pixels(page)))
        assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]
        assert np.abs(seen[0][2] - seen[1][2]).max() > 5  # the pictures differ visibly
        assert page.problems() == []
    finally:
        page.close()


def test_the_checks_see_errors_failed_loads_and_overflow(browser, tmp_path):
    """The checks above could fail: a page with a script error, a missing image and a too-wide block fails them."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta name="viewport" content="width=device-width, initial-scale=1">'
                   '</head><body><div style="width:900px">wide</div><img src="missing.png" alt="">'
                   "<script>undefinedFunction();</script></body></html>")
    page = Page(browser, bad.resolve().as_uri(), 390)
    try:
        problems = page.problems()
        assert any("undefinedFunction" in p for p in problems)
        assert any("failed load" in p or "missing.png" in p for p in problems)
        assert page.js("document.documentElement.scrollWidth") > 390
    finally:
        page.close()


# ------------------------------------------------------------------------------------- classical commands
@pytest.fixture(scope="module")
def gmm_report(tmp_path_factory):
    from typer.testing import CliRunner

    from elbolab.classical.gmm_cli import app

    folder = tmp_path_factory.mktemp("gmm")
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal([0, 0], [1.0, 0.5], (150, 2)), rng.normal([5, 3], [0.7, 1.2], (150, 2)),
                        rng.normal([0, 6], 0.6, (100, 2))])
    np.savetxt(folder / "blobs.csv", X, delimiter=",", header="a,b", comments="")
    result = CliRunner().invoke(app, ["fit", str(folder / "blobs.csv"), "-k", "6", "--method", "vb",
                                      "--out", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out" / "index.html"


@pytest.fixture(scope="module")
def denoise_report(tmp_path_factory):
    import typer
    from typer.testing import CliRunner

    from elbolab.classical.ising_cli import denoise_command

    app = typer.Typer()
    app.command("denoise")(denoise_command)
    app.command("unused")(lambda: None)
    out = tmp_path_factory.mktemp("denoise") / "out"
    result = CliRunner().invoke(app, ["denoise", "--size", "64", "--sweeps", "200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "index.html"


def test_gmm_fit_report_in_the_browser(browser, gmm_report):
    check_layout_and_errors(browser, gmm_report, "report-gmm")


def test_denoise_report_in_the_browser(browser, denoise_report):
    check_layout_and_errors(browser, denoise_report, "report-denoise")


def test_explorer_of_a_four_dimensional_latent(browser, tmp_path):
    """Choosing the plane's dimensions and clicking an encoded example: z follows, the page stays error-free."""
    from elbolab.data import load_data
    from elbolab.explorer import EXPLORER_CSS, explorer_html
    from elbolab.models import get_model_class
    from elbolab.report import write_command_report

    torch.manual_seed(0)
    test = load_data("digits", binarize="none", seed=0).test
    cls = get_model_class("vae")
    model = cls(cls.config_class(input_dim=64, latent_dim=4, hidden=(32,), image_shape=(1, 8, 8))).eval()
    write_command_report(tmp_path, "explorer", sections=[("Explorer", f"<style>{EXPLORER_CSS}</style>"
                                                                      + explorer_html(model, test))])
    page = Page(browser, (tmp_path / "index.html").resolve().as_uri() + "#explorer-test=1.25,-0.75", 1280)
    try:
        assert page.problems() == []
        page.js("(function(){var x=document.getElementById('explorer-dx'),y=document.getElementById('explorer-dy');"
                "x.value='2';x.dispatchEvent(new Event('change'));y.value='3';y.dispatchEvent(new Event('change'));"
                "})()")
        before = page.js("document.getElementById('explorer-z').textContent")
        page.js("document.getElementById('explorer-plane').scrollIntoView()")
        box = page.js("(function(){var r=document.getElementById('explorer-plane').getBoundingClientRect();"
                      "return [r.left,r.top,r.width,r.height];})()")
        # the plane maps [low, high] of each dimension onto [28, 332] of 360 logical pixels, y upwards
        spec = page.js("JSON.parse(document.getElementById('explorer-data').textContent)")
        low, high = spec["low"], spec["high"]
        target = (0.5 * (low[2] + high[2]), low[3] + 0.25 * (high[3] - low[3]))
        fx = (28 + (target[0] - low[2]) / (high[2] - low[2]) * 304) / 360
        fy = (332 - (target[1] - low[3]) / (high[3] - low[3]) * 304) / 360
        page.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box[0] + fx * box[2],
                                               "y": box[1] + fy * box[3]})
        after = [float(v) for v in page.js("document.getElementById('explorer-z').textContent")[5:-1].split(",")]
        old = [float(v) for v in before[5:-1].split(",")]
        assert after[:2] == old[:2]  # the dimensions off the plane keep their values
        assert abs(after[2] - target[0]) < 0.03 * (high[2] - low[2]) and abs(after[3] - target[1]) < 0.03 * (
            high[3] - low[3])
        # a click on an encoded example moves every dimension to its code
        codes = np.frombuffer(base64.b64decode(spec["points"]), dtype="<f4").reshape(spec["n_points"], 4)
        xy = np.stack([28 + (codes[:, 2] - low[2]) / (high[2] - low[2]) * 304,
                       332 - (codes[:, 3] - low[3]) / (high[3] - low[3]) * 304], axis=1)
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(len(xy)) * 1e9
        pick = int(np.argmax(gaps.min(1)))  # the most isolated example: the click cannot hit a neighbour
        for kind in ("mousePressed", "mouseReleased"):
            page.call("Input.dispatchMouseEvent", {"type": kind, "button": "left", "clickCount": 1,
                                                   "x": box[0] + float(xy[pick, 0]) / 360 * box[2],
                                                   "y": box[1] + float(xy[pick, 1]) / 360 * box[3]})
        shown = page.js("document.getElementById('explorer-z').textContent")
        assert shown == "z = (" + ", ".join(f"{v:.2f}" for v in codes[pick]) + ")"
        assert page.problems() == []
    finally:
        page.close()


# ------------------------------------------------------------------------------- one report per model family
FAMILY = dict(epochs=2, batch_size=32, progress=False, tensorboard=False, figures=True, seed=0)
# family -> (model, data, options, a text the report must show for that family)
FAMILIES = {
    "vade": ("vade", "digits", dict(hidden=(32,), latent_dim=4, n_clusters=10, train_size=300), "accuracy"),
    "nvdm": ("nvdm", "20news", dict(hidden=(16,), latent_dim=2, val_size=10), "perplexity"),
    "sprites": ("beta-vae", "sprites", dict(latent_dim=4, hidden=(32,), train_size=64, val_size=64), "beta"),
    "cvae": ("cvae", "digits", dict(hidden=(32,), latent_dim=2, train_size=300), "condition"),
}


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    """family -> a tiny trained and evaluated run folder, made on first use."""
    from conftest import write_bow_corpus

    from elbolab import pipeline

    folders = {}

    def get(family: str) -> Path:
        if family not in folders:
            model, data, options, _ = FAMILIES[family]
            root = tmp_path_factory.mktemp(family)
            if data == "20news":
                options = {**options, "data_dir": write_bow_corpus(root / "20news")}
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                out = pipeline.train(model, data, out=root / "run", **FAMILY, **options)
                pipeline.evaluate(out, k=20, limit=50, data_dir=options.get("data_dir"))
            finally:
                torch.set_num_threads(before)
            folders[family] = out
        return folders[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_model_family_report_in_the_browser(browser, family_run, family):
    run = family_run(family)
    text = (run / "index.html").read_text().lower()
    assert FAMILIES[family][3] in text, f"the {family} report does not mention {FAMILIES[family][3]!r}"
    check_layout_and_errors(browser, run / "index.html", f"report-{family}")
