"""Sliding-window inference (dinov3.seg): the window arithmetic on hand-made cases."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
import pytest
import torch

from jurassiglip.config import params_from_dict
from jurassiglip.data.tokenizer import load_tokenizer
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.predictor import Predictor, window_starts
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import PROTOTYPE, ModelSpec

HEAD = Decision(mask_threshold=0.5, no_target_rule="head", no_target_min_area=0.0, no_target_threshold=0.5)


@pytest.mark.parametrize("length, window, step, starts", [
    (224, 128, 64, [0, 64, 96]),   # the last window flush with the edge
    (256, 128, 64, [0, 64, 128]),  # exact fit: no extra window
    (128, 128, 64, [0]),
    (100, 128, 64, [0]),           # smaller than a window: the one start
    (300, 128, 128, [0, 128, 172]),
])
def test_window_starts_by_hand(length, window, step, starts):
    assert window_starts(length, window, step) == starts


@pytest.mark.parametrize("length", range(128, 420, 7))
@pytest.mark.parametrize("step", [32, 64, 100, 128])
def test_windows_cover_every_pixel_and_stay_inside(length, step):
    covered = np.zeros(length, int)
    for start in window_starts(length, 128, step):
        assert 0 <= start and start + 128 <= length
        covered[start:start + 128] += 1
    assert covered.min() >= 1


@pytest.fixture(scope="module")
def constant(micro_params, micro_data):
    """A real tiny model whose mask logit is 1.5 everywhere: its head's last layer is 0 with bias 1.5."""
    params = params_from_dict(micro_params)
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    spec = dataclasses.replace(ModelSpec.from_params(params, tokenizer), decoder=PROTOTYPE)
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        model.head.mlp[-1].weight.zero_()
        model.head.mlp[-1].bias.fill_(1.5)
    return Predictor(model, tokenizer, spec, HEAD, device="cpu")


def test_a_constant_logit_model_gives_the_constant_back_on_every_pixel(constant):
    side = constant.image_size
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (side * 2 + 37, side + 53, 3), dtype=np.uint8)  # several windows each way
    small = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    sizes = [full.shape[:2], (50, 70)]
    results = constant.infer(np.stack([small, small]), ["the red circle", "the blue square"], [0, 1], sizes,
                             full_images=[full, full], window_stride=0.5)
    for result, size in zip(results, sizes):
        assert result.prob.shape == size
        torch.testing.assert_close(result.prob, torch.full(size, torch.sigmoid(torch.tensor(1.5)).item()))
        assert result.mask.all()


def test_the_no_target_verdict_is_the_global_views(constant):
    side = constant.image_size
    rng = np.random.default_rng(1)
    full = rng.integers(0, 256, (side * 2, side * 2, 3), dtype=np.uint8)
    small = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(full).permute(2, 0, 1)[None].float(), size=(side, side), mode="bilinear")[0]
        .permute(1, 2, 0).round().to(torch.uint8))
    plain = constant.infer(small[None], ["the red circle"], [0], [full.shape[:2]])[0]
    windowed = constant.infer(small[None], ["the red circle"], [0], [full.shape[:2]], full_images=[full])[0]
    assert windowed.no_target_prob == plain.no_target_prob and windowed.no_target == plain.no_target


def test_predict_with_sliding_window_reads_the_image_once_at_its_own_size(constant, tmp_path):
    side = constant.image_size
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (side * 3, side * 2, 3), dtype=np.uint8)).save(path)
    plain, = constant.predict(path, ["the red circle"])
    windowed, = constant.predict(path, ["the red circle"], sliding_window=True)
    assert windowed.mask.shape == plain.mask.shape == (side * 3, side * 2)
    np.testing.assert_allclose(windowed.prob, plain.prob, rtol=0, atol=1e-6)  # constant logits: the same answer
