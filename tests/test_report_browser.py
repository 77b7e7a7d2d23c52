"""The gallery in a real headless Chromium (Debian's `chromium` package): no console errors, the
GLB viewer draws the model, the turntable plays, the batch grid filters.

Talks to Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out,
NUL-separated JSON), so no browser driver or websocket package is needed. Skips, saying why, where
no chromium is installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill3d.engine.config import to_dict
from distill3d.engine.recipe import load_recipe
from distill3d.engine.report import write_report
from distill3d.engine.video import write_video

CHROMIUM = next((p for p in (os.environ.get("DISTILL3D_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
SHOTS = Path(os.environ.get("DISTILL3D_SCREENSHOTS", "")) if os.environ.get("DISTILL3D_SCREENSHOTS") else None


class Browser:
    """Just enough of the DevTools protocol: one page, commands, events, screenshots."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 1200):
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        args = ["--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--no-first-run", "--disable-gpu-sandbox",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist", "--mute-audio",
                f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{res_w}', CHROMIUM, *args],
            pass_fds=(cmd_r, res_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _read(self, timeout: float) -> dict:
        deadline = time.time() + timeout
        while b"\0" not in self.buffer:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.res_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self.res_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: bool = False, timeout: float = 60.0, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, path: Path) -> None:
        self.send("Page.navigate", session=True, url=path.resolve().as_uri())
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, expression: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while not self.evaluate(expression):
            if time.time() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {expression}")
            time.sleep(0.1)

    def screenshot(self, name: str | None = None) -> np.ndarray:
        import imageio.v3 as iio

        png = base64.b64decode(self.send("Page.captureScreenshot", session=True, format="png")["data"])
        if SHOTS is not None and name:
            SHOTS.mkdir(parents=True, exist_ok=True)
            (SHOTS / name).write_bytes(png)
        return iio.imread(io.BytesIO(png))[..., :3]

    def rect(self, selector: str) -> tuple[int, int, int, int]:
        r = self.evaluate(f"JSON.stringify(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
        r = json.loads(r)
        return int(r["x"]), int(r["y"]), int(r["width"]), int(r["height"])

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.res_r)


def _crop(image: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = rect
    return image[y : y + h, x : x + w].astype(np.int16)


def make_run(run_dir: Path) -> Path:
    """A finished run as the trainer leaves it: the resolved oracle recipe, a loss log, eval figures,
    a turntable (a coloured square turning, through the engine's video writer) and a textured GLB
    (the tests' box + sphere, through the engine's mesh writer)."""
    from tests.mesh_fixtures import make_textured_reference

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(load_recipe("oracle-nerf", ["trainer.steps=100"])), sort_keys=False))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(10, 101, 10)))
    (run_dir / "eval.json").write_text(json.dumps({"psnr": 30.5, "mask_iou": 0.97, "per_view": [{"azimuth": a, "psnr": 30 + a / 360} for a in (0, 90, 180, 270)]}))
    frames = []
    for i in range(12):
        frame = np.full((64, 64, 3), 255, np.uint8)
        x = 8 + 3 * i
        frame[20:44, x : x + 16] = (200, 40, 40)
        frames.append(frame)
    write_video(frames, run_dir / "turntable.gif", fps=10)
    make_textured_reference(run_dir / "mesh.glb", texture_size=128)
    return run_dir


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_run_page_shows_model_and_playing_turntable(tmp_path, browser):
    run = make_run(tmp_path / "run")
    page = write_report(run)
    browser.events.clear()
    browser.open(page)
    browser.wait_for("document.querySelector('canvas.glb-viewer').dataset.state === 'ready'")
    time.sleep(0.3)
    first = browser.screenshot("run_page.png")
    assert browser.errors() == []
    # The viewer shows the model: many pixels differ from the page background and from the
    # viewer's own clear colour, and they carry the texture's colours (not one flat shade).
    viewer = _crop(first, browser.rect("canvas.glb-viewer"))
    background = first[5, 5].astype(np.int16)
    clear = viewer[3, 3]
    assert np.abs(clear - background).sum() > 0, "the viewer's clear colour should be visible against the page"
    model = np.abs(viewer - clear).sum(-1) > 30
    assert model.mean() > 0.05, f"only {model.mean():.3f} of the viewer differs from its background"
    pixels = viewer[model]
    chroma = (pixels.max(-1) - pixels.min(-1)).mean()  # the untextured (white) mesh is shades of grey
    assert chroma > 25, f"the model is drawn without its texture's colours (mean chroma {chroma:.1f})"
    # Orbiting changes the picture.
    browser.evaluate("(() => { const v = document.querySelector('canvas.glb-viewer').viewer; v.azimuth += 1.2; v.draw(); return true; })()")
    turned = _crop(browser.screenshot(), browser.rect("canvas.glb-viewer"))
    assert np.abs(turned - viewer).mean() > 2
    # The turntable plays: its picture changes over time.
    turntable = browser.rect("img.turntable")
    assert turntable[2] > 0 and browser.evaluate("document.querySelector('img.turntable').naturalWidth") == 64
    later = browser.screenshot("run_page_later.png")
    assert np.abs(_crop(later, turntable) - _crop(first, turntable)).mean() > 1, "the turntable did not move"
    # Loss curve and eval figures are on the page.
    assert browser.evaluate("document.querySelectorAll('svg.loss-curve polyline').length") == 2
    assert "30.5" in browser.evaluate("document.querySelector('#eval').textContent")
    assert browser.errors() == []


def test_batch_page_grid_filters_and_shows_errors(tmp_path, browser):
    out = tmp_path / "batch"
    make_run(out / "cube")
    (out / "cube" / "job.json").write_text(json.dumps({"status": "done", "seconds": 12.0}))
    (out / "broken").mkdir()
    summary = {
        "recipe": "oracle-nerf",
        "counts": {"done": 1, "failed": 1},
        "jobs": [
            {"name": "cube", "run_dir": "cube", "status": "done", "prompt": "a cube", "seconds": 12.0, "eval": {"psnr": 30.5, "mask_iou": 0.97}},
            {"name": "broken", "run_dir": "broken", "status": "failed", "prompt": "a broken job", "error": "scene nowhere.json does not exist"},
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary))
    page = write_report(out)
    browser.events.clear()
    browser.open(page)
    browser.wait_for("document.querySelector('img.thumb').complete")
    browser.screenshot("batch_page.png")
    assert browser.evaluate("document.querySelectorAll('.card').length") == 2
    assert "nowhere.json" in browser.evaluate("document.querySelector('.card[data-status=failed] pre.error').textContent")
    assert browser.evaluate("document.querySelector('.filter-count').textContent") == "2 shown"
    browser.evaluate("(() => { document.querySelector('button[data-status=failed]').click(); return true; })()")
    assert browser.evaluate("[...document.querySelectorAll('.card')].filter(c => !c.hidden).map(c => c.dataset.status).join()") == "failed"
    browser.evaluate("(() => { document.querySelector('button[data-status=all]').click(); const i = document.querySelector('.filter-text'); "
                     "i.value = 'cube'; i.dispatchEvent(new Event('input')); return true; })()")
    assert browser.evaluate("document.querySelector('.filter-count').textContent") == "1 shown"
    # The card links to the run's own page, which has the viewer.
    browser.open(out / "cube" / "index.html")
    browser.wait_for("document.querySelector('canvas.glb-viewer').dataset.state === 'ready'")
    assert browser.errors() == []
