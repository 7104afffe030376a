"""Inference on awkward inputs, with the checkpoint the micro pipeline trained (the reference run's best.safetensors).

Any Pillow mode (1, L, P, RGBA, CMYK, I;16, LA, F, I read from real files;
YCbCr, HSV, LAB, PA, RGBX, I;16B in memory), images from 1x1 to 8000x8000,
and captions that are non-ASCII, very long or empty, through the Python
API, the CLI's main() and the installed `jurassiglip predict` command.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jurassiglip.cli import main as cli
from jurassiglip.config import load_params
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.predictor import Predictor

NON_ASCII = ["der rote Kreis oben", "红色的圆", "l'étoile jaune à gauche 🦕"]
LONG = "the big red circle to the left of the small blue square " * 300  # ~17k characters, far above text_max_len


@pytest.fixture(scope="module")
def best(reference_run) -> Path:
    return reference_run.root / "data/seg_finetune/checkpoints/best.safetensors"


@pytest.fixture(scope="module")
def predictor(reference_run, best) -> Predictor:
    params = load_params(reference_run.root / "params.yaml")  # what the CLI takes when no flag is given
    return Predictor.from_checkpoint(best, Decision.from_config(params.evaluate), device="cpu")


def scene(width: int, height: int) -> np.ndarray:
    """A gradient with a bright square: uint8 (H, W, 3) with real content in every channel."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    rgb[height // 4: height // 2, width // 4: width // 2] = (230, 40, 40)
    return rgb.astype(np.uint8)


def in_mode(mode: str, width: int = 45, height: int = 29) -> Image.Image:
    rgb = Image.fromarray(scene(width, height))
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))  # the full 16-bit range
    if mode in ("F", "I"):
        return rgb.convert("L").convert(mode)
    return rgb.convert(mode)


# mode -> a file format that stores it as such
FILES = {"1": "png", "L": "png", "P": "png", "RGBA": "png", "LA": "png", "I;16": "png", "CMYK": "tiff",
         "F": "tiff", "I": "tiff"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(FILES))
def test_every_image_mode_read_from_a_file(predictor, tmp_path, mode):
    path = tmp_path / f"scene.{FILES[mode]}"
    in_mode(mode).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode  # the file really holds that mode
    results = predictor.predict(path, ["the red square", "all blue shapes"])
    for r in results:
        assert r.mask.shape == r.prob.shape == (29, 45) and r.mask.dtype == bool
        assert np.isfinite(r.prob).all() and 0.0 <= r.prob.min() <= r.prob.max() <= 1.0
    # modes are converted, not misread: a 16-bit image predicts like its 8-bit original
    if mode == "I;16":
        eight = predictor.predict(in_mode("L"), ["the red square"])[0]
        np.testing.assert_allclose(results[0].prob, eight.prob, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB", "PA", "RGBX", "I;16B"])
def test_modes_that_only_exist_in_memory(predictor, mode):
    image = Image.new(mode, (45, 29))
    (result,) = predictor.predict(image, ["the red square"])
    assert result.mask.shape == (29, 45) and np.isfinite(result.prob).all()


@pytest.mark.slow
@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1)])
def test_tiny_and_thin_images(predictor, size):  # 8000x8000: test_cli_main_huge_image, through the same API
    width, height = size
    (result,) = predictor.predict(Image.fromarray(scene(width, height)), ["the blue square"])
    assert result.mask.shape == (height, width) and result.prob.dtype == np.float32
    assert 0.0 <= result.area <= 1.0 and np.isfinite(result.score)


@pytest.mark.slow
def test_non_ascii_and_very_long_captions(predictor):
    results = predictor.predict(in_mode("RGB"), NON_ASCII + [LONG])
    assert [r.text for r in results] == NON_ASCII + [LONG]
    assert all(r.mask.shape == (29, 45) and np.isfinite(r.prob).all() for r in results)
    # truncation: everything after text_max_len tokens is ignored, so a longer tail changes nothing
    # (up to float noise: here the caption goes through the model in a batch of 1 instead of 4)
    longer = predictor.predict(in_mode("RGB"), [LONG + " and the purple star"])[0]
    np.testing.assert_allclose(longer.prob, results[-1].prob, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("caption", ["", "   ", "\n\t"])
def test_empty_caption_refused_clearly(predictor, caption):
    with pytest.raises(ValueError, match="empty caption"):
        predictor.predict(in_mode("RGB"), ["the red square", caption])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["LA", "F", "CMYK", "1"])
def test_cli_main_any_mode(best, tmp_path, mode):
    path = tmp_path / f"scene.{FILES[mode]}"
    in_mode(mode, 64, 48).save(path)
    out = tmp_path / "out"
    assert cli(["predict", "--image", str(path), "--text", NON_ASCII[1], "--text", LONG, "--checkpoint", str(best),
                "--out", str(out), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["text"] for line in lines] == [NON_ASCII[1], LONG]
    assert len({line["mask"] for line in lines}) == 2  # distinct files even when the slug is empty
    for line in lines:
        assert Image.open(out / line["mask"]).size == Image.open(out / line["overlay"]).size == (64, 48)


@pytest.mark.slow
def test_cli_main_huge_image(best, tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 8000), (30, 90, 200)).save(path, quality=90)
    out = tmp_path / "out"
    assert cli(["predict", "--image", str(path), "--text", "the blue square", "--checkpoint", str(best),
                "--out", str(out), "--device", "cpu"]) == 0
    (line,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    with Image.open(out / line["mask"]) as mask, Image.open(out / line["overlay"]) as overlay:
        assert mask.size == overlay.size == (8000, 8000) and mask.mode == "L"
    assert 0.0 <= line["area"] <= 1.0


@pytest.mark.slow
def test_cli_main_refuses_an_empty_caption_with_exit_code_2(best, tmp_path, caplog):
    path = tmp_path / "scene.png"
    in_mode("RGB").save(path)
    with caplog.at_level(logging.ERROR):
        code = cli(["predict", "--image", str(path), "--text", "", "--checkpoint", str(best), "--out",
                    str(tmp_path / "out")])
    assert code == 2 and "empty caption" in caplog.text
    assert not (tmp_path / "out").exists()


def installed_cli() -> list[str]:
    script = Path(sys.executable).with_name("jurassiglip")
    return [str(script)] if script.exists() else [shutil.which("jurassiglip") or "jurassiglip"]


@pytest.mark.slow
def test_installed_command_end_to_end(best, tmp_path):
    path = tmp_path / "scene.png"
    in_mode("LA").save(path)
    out = tmp_path / "out"
    ok = subprocess.run([*installed_cli(), "predict", "--image", str(path), "--text", NON_ASCII[2], "--text", LONG,
                         "--checkpoint", str(best), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    texts = [json.loads(line)["text"] for line in (out / "predictions.jsonl").read_text("utf-8").splitlines()]
    assert texts == [NON_ASCII[2], LONG]
