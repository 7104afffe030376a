"""`jurassiglip demo` in a real browser: Debian's headless Chromium driven by Playwright.

The demo runs as the installed command in a micro project (params.yaml,
dvc.yaml, a tiny seg_finetune checkpoint at the default path, the micro
manifest and its images), so the checkpoint, the decision defaults and the
examples all come the way they come for a user. What the page shows is
checked against `Predictor.predict` and against the PNG `jurassiglip
predict` writes for the same inputs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright
from test_predictor import write_checkpoint

from jurassiglip.cli import main as cli
from jurassiglip.config import load_params
from jurassiglip.data.manifest import Manifest
from jurassiglip.inference.demo import MAX_PHRASES, MAX_PIXELS, DemoModel, add_arguments, example_rows
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.predictor import Predictor
from jurassiglip.model import checkpoint
from jurassiglip.runtime.paths import FINETUNE_CHECKPOINTS, MANIFEST_DIR, stage_dir

PHRASES = ["the red circle", "all blue dinosaurs"]  # "dinosaurs": a word the micro tokenizer never saw
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WAIT_MS = 120_000  # what the page may take to answer on a busy 2-core machine (a guard, not a measurement)

pytestmark = pytest.mark.slow


@dataclass
class Demo:
    url: str
    process: subprocess.Popen
    log: list[str]  # stderr lines so far
    cache: Path     # Gradio's private cache folder, named in the start-up line
    before: list[tuple[Path, int]]  # the project's files and their mtimes before the demo started

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def files(project: Path) -> list[tuple[Path, int]]:
    return sorted((path, path.lstat().st_mtime_ns) for path in project.rglob("*"))


def start_demo(project: Path, *flags: str) -> Demo:
    """`jurassiglip demo` in `project` on a free port, returned once its page is served."""
    before = files(project)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(sys.executable).with_name("jurassiglip")
    process = subprocess.Popen([str(script), "demo", "--port", str(port), "--device", "cpu", *flags], cwd=project,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    started = threading.Event()

    def drain() -> None:  # keeps the pipe from filling while the demo runs
        for line in process.stderr:
            log.append(line)
            if "demo on http://" in line:
                started.set()
        started.set()

    threading.Thread(target=drain, daemon=True).start()
    started.wait(timeout=300)
    line = next((x for x in log if "demo on http://" in x), None)
    assert line is not None, "the demo did not start:\n" + "".join(log)[-4000:]
    return Demo(re.search(r"http://\S+", line)[0] + "/", process, log, Path(re.search(r"cache: (\S+),", line)[1]),
                before)


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_data, micro_params) -> Path:
    """A project as `dvc repro` leaves it, for what the demo reads: a random tiny checkpoint at the default path."""
    root = tmp_path_factory.mktemp("demo") / "project"
    (root / FINETUNE_CHECKPOINTS).mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(micro_params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / stage_dir("build_manifest")).symlink_to(micro_data)  # manifest/, source/ (images), tokenizer/
    write_checkpoint(root / FINETUNE_CHECKPOINTS / checkpoint.BEST, micro_data, micro_params)
    return root


@pytest.fixture(scope="module")
def demo(project):
    running = start_demo(project)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: .ci/run installs Debian's package (elsewhere: apt-get install chromium)")
    with sync_playwright() as playwright:
        # As root Chromium needs --no-sandbox; the rest keeps it from calling home (the machine has no network).
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, chromium_sandbox=False,
            args=["--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, demo):
    """A fresh tab on the demo; every request it makes is recorded in `page.requests`."""
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    tab.requests = []
    tab.on("request", lambda request: tab.requests.append(request.url))
    tab.goto(demo.url)
    yield tab
    tab.close()


@pytest.fixture(scope="module")
def image(project) -> Path:
    """A validation image of the micro set (a JPEG at its own, non-square size)."""
    return Path(example_rows(project / "params.yaml")[0][0])


def defaults(project: Path) -> Decision:
    return Decision.from_config(load_params(project / "params.yaml").evaluate)


def upload(page: Page, path: Path) -> None:
    page.locator("#image input[type=file]").set_input_files(str(path))
    expect(page.locator(f'#image img[src*="{path.name}"]')).to_be_attached(timeout=WAIT_MS)


def segment(page: Page, image: Path, phrases: list[str]) -> None:
    upload(page, image)
    page.locator("#phrases textarea").fill("\n".join(phrases))
    page.locator("#segment").click()


def verdict(no_target: bool) -> str:
    return "verdict: no target" if no_target else "verdict: target"


def shown_image(page: Page, selector: str) -> np.ndarray:
    """The pixels the browser was served for the <img> under `selector`."""
    src = page.locator(f"{selector} img").get_attribute("src")
    response = page.request.get(src)
    assert response.ok, src
    return np.asarray(Image.open(BytesIO(response.body())))


def test_two_phrases_show_what_predict_gives_and_writes(page, demo, project, image, tmp_path, monkeypatch):
    expected = Predictor.from_checkpoint(project / FINETUNE_CHECKPOINTS / checkpoint.BEST, defaults(project),
                                         device="cpu").predict(image, PHRASES)
    segment(page, image, PHRASES)
    for k, result in enumerate(expected):
        panel = page.locator(f"#verdict-{k}")
        expect(panel).to_contain_text(f'"{result.text}"', timeout=WAIT_MS)
        expect(panel).to_contain_text(verdict(result.no_target))
        expect(panel).to_contain_text(f"no-target probability {result.no_target_prob:.3f}")
        expect(panel).to_contain_text(f"mask area {100 * result.area:.2f} %")
        for warning in result.warnings:  # e.g. the unknown word
            expect(panel).to_contain_text(f"warning: {warning}")
    assert page.locator("[id^=verdict-]").count() == 2
    expect(page.locator("#status")).to_contain_text(defaults(project).describe())

    monkeypatch.chdir(project)  # predict takes its decision from the same params.yaml
    assert cli(["predict", "--image", str(image), "--text", PHRASES[0], "--text", PHRASES[1],
                "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    for k in range(2):
        written = np.asarray(Image.open(next((tmp_path / "out").glob(f"{k:02d}_*_overlay.png"))))
        np.testing.assert_array_equal(shown_image(page, f"#overlay-{k}"), written)
        assert shown_image(page, f"#heatmap-{k}").shape == written.shape
    # offline: the page loads nothing from anywhere but the demo itself
    assert [url for url in page.requests if not url.startswith((demo.url, "data:", "blob:"))] == []


def test_thresholds_on_the_page_change_the_verdicts(page, project, image):
    start = defaults(project)
    expect(page.locator("#mask-threshold input[type=number]")).to_have_value(str(start.mask_threshold))
    expect(page.locator("#no-target-threshold input[type=number]")).to_have_value(str(start.no_target_threshold))
    segment(page, image, PHRASES)
    predictor = Predictor.from_checkpoint(project / FINETUNE_CHECKPOINTS / checkpoint.BEST, start, device="cpu")
    page.locator("#no-target-rule label", has_text="head").click()
    for threshold in (0.001, 0.999):  # the slider's ends: all no target, then none (a random head is near 0.5)
        box = page.locator("#no-target-threshold input[type=number]")
        box.fill(str(threshold))
        box.press("Enter")
        page.locator("#segment").click()
        predictor.decision = Decision(start.mask_threshold, "head", start.no_target_min_area, threshold)
        for k, result in enumerate(predictor.predict(image, PHRASES)):
            assert result.no_target is (threshold == 0.001)
            expect(page.locator(f"#verdict-{k}")).to_contain_text(verdict(result.no_target), timeout=WAIT_MS)


def test_examples_are_the_manifests_validation_images(page, project):
    rows = example_rows(project / "params.yaml")
    table = Manifest.load(project / MANIFEST_DIR).images_table
    assert rows and {Path(image).name for image, _ in rows} <= set(table[table.split == "val"].file_name)
    page.get_by_text(rows[0][1].splitlines()[0]).first.click()
    expect(page.locator("#phrases textarea")).to_have_value(rows[0][1], timeout=WAIT_MS)
    expect(page.locator(f'#image img[src*="{Path(rows[0][0]).name}"]')).to_be_attached(timeout=WAIT_MS)


def test_bad_inputs_give_a_message_on_the_page(page, image, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 8000)).save(huge)  # 64 megapixels in a few kB
    assert 8000 * 8000 > MAX_PIXELS
    status = page.locator("#status")
    page.locator("#segment").click()
    expect(status).to_contain_text("no image", timeout=WAIT_MS)
    segment(page, image, ["   ", ""])
    expect(status).to_contain_text("no phrase: type at least one", timeout=WAIT_MS)
    segment(page, broken, PHRASES)
    expect(status).to_contain_text("broken.png: cannot read the image", timeout=WAIT_MS)
    segment(page, huge, PHRASES)
    expect(status).to_contain_text("huge.png: 8000x8000 is 64 megapixels", timeout=WAIT_MS)
    assert page.locator("[id^=verdict-]").count() == 0
    assert "Traceback" not in page.content()


def test_nothing_is_written_to_the_project(page, demo, project, image):
    segment(page, image, PHRASES)
    expect(page.locator("#overlay-1 img")).to_be_attached(timeout=WAIT_MS)
    assert files(project) == demo.before


def test_wrong_checkpoint_is_said_on_the_page(browser, project, image, tmp_path):
    """The page starts anyway, to say why it cannot segment; the demo's cache goes when it stops."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    running = start_demo(project, "--checkpoint", str(junk))
    try:
        tab = browser.new_page()
        tab.goto(running.url)
        expect(tab.locator("#status")).to_contain_text("junk.safetensors: not a readable checkpoint",
                                                       timeout=WAIT_MS)
        expect(tab.locator("#segment")).to_be_disabled()
        upload(tab, image)  # the rest of the page still works
        assert list(running.cache.rglob(image.name))  # the upload went to Gradio's private cache ...
    finally:
        assert running.stop() == 0
    assert not running.cache.exists()  # ... which is gone once the demo stops


def test_a_taken_port_is_said_in_one_line(project):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(Path(sys.executable).with_name("jurassiglip")), "demo", "--port", str(port),
                               "--device", "cpu"], cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_the_model_behind_the_page_refuses_what_it_cannot_answer(project, micro_data, micro_params, image, tmp_path,
                                                                 monkeypatch):
    no_head = write_checkpoint(tmp_path / "no_head.safetensors", micro_data, micro_params, no_target=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.chdir(project)  # the decision defaults come from its params.yaml
    model = DemoModel.load(parser.parse_args(["--checkpoint", str(no_head), "--device", "cpu",
                                              "--no-target-rule", "area"]))
    assert model.error is None
    start, upload = model.decision, {"path": str(image), "orig_name": image.name}
    ask = dict(mask_threshold=start.mask_threshold, no_target_rule="area",
               no_target_threshold=start.no_target_threshold, no_target_min_area=start.no_target_min_area)
    assert len(model.segment(upload, "\n\n".join(PHRASES), **ask).panels) == 2  # blank lines are no phrases
    too_many = model.segment(upload, "\n".join(["the red circle"] * (MAX_PHRASES + 1)), **ask)
    assert too_many.panels == [] and f"up to {MAX_PHRASES}" in too_many.error
    head = model.segment(upload, PHRASES[0], **{**ask, "no_target_rule": "head"})
    assert head.panels == [] and "untrained no-target head" in head.error
