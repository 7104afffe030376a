"""Inference from a checkpoint alone: Python API and `jurassiglip predict`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from jurassiglip.model import checkpoint
from jurassiglip.cli import main as cli
from jurassiglip.config import params_from_dict
from jurassiglip.data.tokenizer import load_tokenizer
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import ModelSpec
from jurassiglip.inference.decision import Decision, DecisionError
from jurassiglip.inference.predictor import Predictor, caption_warnings

AREA = Decision(mask_threshold=0.5, no_target_rule="area", no_target_min_area=0.002, no_target_threshold=0.5)


def write_checkpoint(path, micro_data, micro_params, stage="seg_finetune", no_target=True):
    params = params_from_dict(micro_params)
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    spec = ModelSpec.from_params(params, tokenizer)
    torch.manual_seed(0)
    model = build_model(spec)
    checkpoint.save(path, {"spec": spec, "model": model, "tokenizer": tokenizer, "stage": stage,
                           "heads": {"segmentation": stage == "seg_finetune", "no_target": no_target}})
    return path


@pytest.fixture(scope="module")
def ckpt(micro_data, micro_params, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / checkpoint.BEST, micro_data, micro_params)


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor.from_checkpoint(ckpt, AREA, device="cpu")


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16"])
def test_any_mode_and_size_gives_masks_at_the_image_size(predictor, mode):
    image = Image.new(mode, (37, 21))
    results = predictor.predict(image, ["the red circle", "all blue shapes"])
    assert [r.text for r in results] == ["the red circle", "all blue shapes"]
    for r in results:
        assert r.mask.shape == r.prob.shape == (21, 37) and r.mask.dtype == bool
        assert 0.0 <= r.area <= 1.0 and isinstance(r.no_target, bool)


def test_one_pixel_image(predictor):
    (result,) = predictor.predict(Image.new("RGB", (1, 1), "red"), ["the red square"])
    assert result.mask.shape == (1, 1)


def test_bad_inputs_are_refused_clearly(predictor, tmp_path):
    with pytest.raises(ValueError, match="empty caption"):
        predictor.predict(Image.new("RGB", (8, 8)), ["  "])
    with pytest.raises(ValueError, match="no caption"):
        predictor.predict(Image.new("RGB", (8, 8)), [])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot read the image"):
        predictor.predict(broken, ["the red circle"])
    with pytest.raises(FileNotFoundError, match="missing.png: image not found"):
        predictor.predict(tmp_path / "missing.png", ["the red circle"])


def test_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="nope.safetensors: checkpoint not found"):
        Predictor.from_checkpoint(tmp_path / "nope.safetensors", AREA)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="foreign.safetensors: not a jurassiglip checkpoint"):
        Predictor.from_checkpoint(foreign, AREA)


def test_old_full_checkpoint_says_to_retrain(tmp_path):
    """Format 1 (torch pickles named best.pt) is refused with what to do, whichever name is asked for."""
    old = tmp_path / "best.pt"
    torch.save({"format": 1, "spec": {}, "model": {}}, old)
    with pytest.raises(checkpoint.CheckpointError, match=r"best.pt: a torch pickle.*retrain with `dvc repro`"):
        Predictor.from_checkpoint(old, AREA)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"best.safetensors: checkpoint not found \(best.pt beside it is a format-1 checkpoint"):
        Predictor.from_checkpoint(tmp_path / checkpoint.BEST, AREA)


@pytest.mark.parametrize("stage, no_target, rule, message", [
    ("contrastive_pretrain", False, "area",
     "was written by contrastive_pretrain: its segmentation head is untrained; "
     "use data/seg_finetune/checkpoints/best.safetensors"),
    ("seg_finetune", False, "head", "trained with finetune.no_target_weight 0): use --no-target-rule area"),
])
def test_cli_refuses_heads_not_trained_for_the_rule_in_one_line(micro_data, micro_params, tmp_path, caplog, stage,
                                                                  no_target, rule, message):
    path = write_checkpoint(tmp_path / checkpoint.BEST, micro_data, micro_params, stage, no_target)
    image = tmp_path / "scene.png"
    Image.new("RGB", (24, 24)).save(image)
    code = cli(["predict", "--image", str(image), "--text", "the red square", "--checkpoint", str(path),
                "--no-target-rule", rule, "--out", str(tmp_path / "out")])
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == 2 and record.getMessage().startswith(f"{path} ") and message in record.getMessage()
    assert "\n" not in record.getMessage() and record.exc_info is None
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_refusal_is_one_line_on_stderr_without_traceback(micro_data, micro_params, tmp_path):
    path = write_checkpoint(tmp_path / checkpoint.BEST, micro_data, micro_params, "contrastive_pretrain", False)
    image = tmp_path / "scene.png"
    Image.new("RGB", (24, 24)).save(image)
    result = subprocess.run([sys.executable, "-m", "jurassiglip.cli", "predict", "--image", str(image), "--text", "x",
                             "--checkpoint", str(path), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if "was written by contrastive_pretrain" in line]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_untrained_no_target_head_is_fine_under_the_area_rule(micro_data, micro_params, tmp_path):
    path = write_checkpoint(tmp_path / checkpoint.BEST, micro_data, micro_params, no_target=False)
    assert Predictor.from_checkpoint(path, AREA, device="cpu").image_size == 32


def test_cli_writes_mask_overlay_and_json_per_caption(ckpt, tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGBA", (40, 30), (200, 10, 10, 255)).save(image)
    out = tmp_path / "out"
    code = cli(["predict", "--image", str(image), "--text", "the red square", "--text", "all blue shapes",
                "--checkpoint", str(ckpt), "--out", str(out)])
    assert code == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == ["the red square", "all blue shapes"]
    for line in lines:
        mask = np.asarray(Image.open(out / line["mask"]))
        assert mask.shape == (30, 40) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(out / line["overlay"]).size == (40, 30)
        assert line["area"] == pytest.approx((mask > 0).mean(), abs=1e-6)


def test_cli_reports_errors_with_exit_code(ckpt, tmp_path, caplog):
    code = cli(["predict", "--image", str(tmp_path / "none.png"), "--text", "x", "--checkpoint", str(ckpt),
                "--out", str(tmp_path / "o")])
    assert code == 2 and "none.png: image not found" in caplog.text


def test_decision_rules():
    prob = torch.zeros(2, 10, 10)
    prob[0, :5, :5] = 0.9  # 25 % of the image is foreground
    prob[1, 0, 0] = 0.9   # 1 %
    nt_prob = torch.tensor([0.8, 0.2])
    masks, by_head = Decision(0.5, "head", no_target_min_area=0.02, no_target_threshold=0.5).masks(prob, nt_prob)
    assert by_head.tolist() == [True, False]  # the head's word, whatever the area
    assert masks.flatten(1).sum(1).tolist() == [25, 1]
    _, by_area = Decision(0.5, "area", no_target_min_area=0.02, no_target_threshold=0.5).masks(prob, nt_prob)
    assert by_area.tolist() == [False, True]  # 1 % < 2 %
    with pytest.raises(ValueError, match="'size'"):
        Decision(0.5, "size", 0.02, 0.5)


def test_cli_rule_flags_reach_the_verdict(ckpt, tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (24, 24), (10, 10, 200)).save(image)
    verdicts = {}
    for threshold in ("0.001", "0.999"):  # the untrained head's probability lies between the two
        out = tmp_path / threshold
        assert cli(["predict", "--image", str(image), "--text", "the blue square", "--checkpoint", str(ckpt),
                    "--no-target-rule", "head", "--no-target-threshold", threshold, "--out", str(out)]) == 0
        (line,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert 0.001 < line["no_target_prob"] < 0.999
        verdicts[threshold] = line["no_target"]
    assert verdicts == {"0.001": True, "0.999": False}


def test_decision_has_no_defaults_of_its_own():
    """The numbers live in params.yaml only; `from_config` is the way to them."""
    with pytest.raises(TypeError):
        Decision()


def project(root, micro_params, micro_data, **evaluate):
    """A folder holding params.yaml (evaluate section overridden), dvc.yaml and a checkpoint two levels down."""
    params = {**micro_params, "evaluate": {**micro_params["evaluate"], **evaluate}}
    (root / "data" / "seg_finetune").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    return write_checkpoint(root / "data" / "seg_finetune" / checkpoint.BEST, micro_data, micro_params)


def predict_verdict(path, image, out, *flags):
    assert cli(["predict", "--image", str(image), "--text", "the blue square", "--checkpoint", str(path),
                "--out", str(out), *flags]) == 0
    (line,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return line["no_target"]


def test_cli_defaults_come_from_the_checkpoints_repository(micro_data, micro_params, tmp_path, monkeypatch):
    """Without flags, run from anywhere, `jurassiglip predict` decides as that repository's evaluate does."""
    image = tmp_path / "scene.png"
    Image.new("RGB", (24, 24), (10, 10, 200)).save(image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no params.yaml here
    verdicts = {}
    for threshold in (0.001, 0.999):  # the untrained head's probability lies between the two
        path = project(tmp_path / str(threshold), micro_params, micro_data, no_target_rule="head",
                       no_target_threshold=threshold)
        verdicts[threshold] = predict_verdict(path, image, tmp_path / f"out{threshold}")
    assert verdicts == {0.001: True, 0.999: False}
    # a flag beats the file; ./params.yaml beats the checkpoint's repository
    assert predict_verdict(path, image, tmp_path / "flag", "--no-target-threshold", "0.001") is True
    (elsewhere / "params.yaml").write_text((tmp_path / "0.001" / "params.yaml").read_text())
    assert predict_verdict(path, image, tmp_path / "cwd") is True


def test_cli_without_params_nor_flags_asks_for_the_flags(ckpt, tmp_path, monkeypatch, caplog):
    image = tmp_path / "scene.png"
    Image.new("RGB", (24, 24)).save(image)
    monkeypatch.chdir(tmp_path)
    code = cli(["predict", "--image", str(image), "--text", "x", "--checkpoint", str(ckpt), "--out",
                str(tmp_path / "out"), "--mask-threshold", "0.5"])
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == 2 and "\n" not in record.getMessage()
    assert record.getMessage().endswith("give --no-target-rule --no-target-min-area --no-target-threshold")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, value, why", [
    ("mask_threshold", 5.0, "must be a probability in (0, 1)"),
    ("mask_threshold", float("nan"), "must be a probability in (0, 1)"),  # every comparison with NaN is False
    ("mask_threshold", 1.0, "must be a probability in (0, 1)"),
    ("no_target_threshold", -1.0, "must be a probability in (0, 1)"),
    ("no_target_threshold", True, "must be a probability in (0, 1)"),
    ("no_target_min_area", 1.0, "must be a fraction in [0, 1)"),
    ("no_target_min_area", "0.1", "must be a fraction in [0, 1)"),
])
def test_decision_refuses_thresholds_out_of_range_naming_them(name, value, why):
    values = {"mask_threshold": 0.5, "no_target_rule": "head", "no_target_min_area": 0.01, "no_target_threshold": 0.5}
    with pytest.raises(DecisionError) as err:
        Decision(**{**values, name: value})
    assert (err.value.name, err.value.why) == (name, why)
    assert str(err.value) == f"{name} = {value!r} {why}"


def test_decision_takes_the_ranges_params_yaml_allows():
    Decision(np.float32(0.4), "area", 0.0, 0.999)  # numpy numbers; no minimum area: the area rule never says none


def test_caption_warnings_with_the_word_tokenizer(micro_data):
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    assert "the" in tokenizer.get_vocab() and "zorgle" not in tokenizer.get_vocab()
    assert caption_warnings(tokenizer, "The", 8) == ([], [])  # lower-cased by the tokenizer: known
    assert caption_warnings(tokenizer, "the zorgle!", 8) == (["zorgle!"], ["unknown words, read as <unk>: 'zorgle!'"])
    words, (warning,) = caption_warnings(tokenizer, "🦖🦖 zorgle", 8)
    assert words == ["🦖🦖", "zorgle"]
    assert warning == ("no known word: the tokenizer knows none of its words ('🦖🦖', 'zorgle'), "
                       "so the answer does not depend on the caption")
    assert caption_warnings(tokenizer, "the " * 9, 8) == (
        [], ["longer than the 8 tokens the model reads: the rest is ignored"])


def test_caption_warnings_with_a_siglip2_format_tokenizer():
    """Gemma's tokenizer cuts unknown words into pieces: the whole word is named. SigLIP2 adds EOS: a
    caption of which only EOS is read (here text_max_len 1) knows no word either."""
    from real_format import train_siglip2_tokenizer

    tokenizer = train_siglip2_tokenizer(["the red circle", "all blue squares", "the yellow star on the left"])
    assert caption_warnings(tokenizer, "The red circle", 16) == ([], [])
    words, warnings = caption_warnings(tokenizer, "the red zorgle", 16)
    assert words == ["zorgle"] and warnings == ["unknown words, read as <unk>: 'zorgle'"]
    assert caption_warnings(tokenizer, "🦖", 16)[1][0].startswith("no known word")
    words, warnings = caption_warnings(tokenizer, "red", 1)
    assert words == [] and warnings == [
        "no known word: the tokenizer knows none of its words (it gives only special tokens), so the answer "
        "does not depend on the caption", "longer than the 1 tokens the model reads: the rest is ignored"]


def test_predictions_carry_the_unknown_words_and_their_warning(predictor, caplog):
    with caplog.at_level(logging.WARNING):
        known, unknown = predictor.predict(Image.new("RGB", (16, 16)), ["the", "🦖🦖"])
    assert (known.unknown_words, known.warnings) == ([], [])
    assert unknown.unknown_words == ["🦖🦖"] and unknown.warnings[0].startswith("no known word")
    assert [r.getMessage() for r in caplog.records] == [f"caption '🦖🦖': {unknown.warnings[0]}"]


def test_a_path_is_read_upright_an_image_object_as_given(predictor, tmp_path):
    stored = np.zeros((10, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # turn 90° counter-clockwise to view
    Image.fromarray(stored).save(tmp_path / "tagged.png", exif=exif.tobytes())
    (from_path,) = predictor.predict(tmp_path / "tagged.png", ["the"])
    assert from_path.mask.shape == (30, 10)
    with Image.open(tmp_path / "tagged.png") as opened:
        (from_object,) = predictor.predict(opened, ["the"])
    assert from_object.mask.shape == (10, 30)
