"""Tests of jurassiglip.inference.render (colours where expected, sizes) and of the gallery page (escaping)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

import jurassiglip.inference.render as render
from jurassiglip.inference.gallery import gallery_html
from jurassiglip.inference.render import (
    ERROR_LEGEND,
    FN_COLOR,
    FP_COLOR,
    GT_COLOR,
    TP_COLOR,
    RowSpec,
    heatmap,
    mask_outline,
    overlay_errors,
    overlay_mask,
    panel,
    spotlight,
    wash_out,
)


def mask(*rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def grey_image(h: int, w: int, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def row(caption: str = "the red square", size: int = 8, gt_nt: bool = False, pred_nt: bool = False) -> RowSpec:
    gt = np.zeros((size, size), dtype=bool)
    if not gt_nt:
        gt[1:5, 1:5] = True
    pred = np.zeros((size, size), dtype=bool)
    pred[2:6, 2:6] = True
    prob = np.linspace(0.0, 1.0, size * size).reshape(size, size)
    return RowSpec(caption, gt, pred, prob, iou=9 / 23, gt_nt=gt_nt, pred_nt=pred_nt)


# --- overlays ------------------------------------------------------------------------


def test_overlay_mask_blends_inside_only():
    image = grey_image(3, 4)
    m = mask("#...", "....", "...#")
    out = overlay_mask(image, m, color=(200, 0, 50), alpha=0.5)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    # 0.5 * 100 + 0.5 * (200, 0, 50) = (150, 50, 75)
    assert out[0, 0].tolist() == [150, 50, 75]
    assert out[2, 3].tolist() == [150, 50, 75]
    assert (out[~m] == 100).all()
    assert (image == 100).all()  # the input is not modified


def test_overlay_errors_colours_each_class_where_expected():
    pred = mask(
        "##.",
        "##.",
        "...",
    )
    gt = mask(
        ".#.",
        ".##",
        "...",
    )
    # TP = pred AND gt: (0,1), (1,1); FP = pred only: (0,0), (1,0);
    # FN = gt only: (1,2); the rest is true negative.
    image = grey_image(3, 3)
    solid = overlay_errors(image, pred, gt, alpha=1.0)
    expected = np.full((3, 3, 3), 100, dtype=np.uint8)
    expected[0, 1] = expected[1, 1] = TP_COLOR
    expected[0, 0] = expected[1, 0] = FP_COLOR
    expected[1, 2] = FN_COLOR
    np.testing.assert_array_equal(solid, expected)

    # At the default alpha the colours are blends and true negatives stay put.
    blended = overlay_errors(image, pred, gt)
    assert (blended[2] == 100).all() and (blended[0, 2] == 100).all()
    assert len({tuple(blended[0, 1]), tuple(blended[0, 0]), tuple(blended[1, 2])}) == 3


def test_error_colours_are_distinct_and_in_the_legend():
    colours = [TP_COLOR, FP_COLOR, FN_COLOR]
    assert len(set(colours)) == 3
    assert [entry[1] for entry in ERROR_LEGEND] == colours
    assert [entry[0] for entry in ERROR_LEGEND] == ["TP", "FP", "FN"]


def test_overlays_validate_inputs():
    with pytest.raises(ValueError):
        overlay_mask(np.zeros((3, 3), np.uint8), np.zeros((3, 3), bool), (0, 0, 0))
    with pytest.raises(TypeError):
        overlay_mask(grey_image(3, 3), np.zeros((3, 3), np.uint8), (0, 0, 0))
    with pytest.raises(ValueError):
        overlay_errors(grey_image(3, 3), np.zeros((3, 2), bool), np.zeros((3, 3), bool))


def test_wash_out_is_grey_and_lighter():
    image = np.array([[[200, 30, 30], [0, 0, 0]]], dtype=np.uint8)
    out = wash_out(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # Black becomes 0.55 * 255 = 140.25 -> 140.
    assert out[0, 1].tolist() == [140, 140, 140]


def test_mask_outline_is_the_inner_ring():
    m = mask(
        ".....",
        ".###.",
        ".###.",
        ".###.",
        ".....",
    )
    # A 3x3 square loses only its centre to a 1-pixel erosion: an 8-pixel ring.
    expected = m.copy()
    expected[2, 2] = False
    np.testing.assert_array_equal(mask_outline(m, width=1), expected)
    # A full mask's outline is the image border, so edge-touching masks stay closed.
    full = np.ones((4, 4), dtype=bool)
    assert mask_outline(full, width=1).sum() == 12


def test_spotlight_outlines_and_dims():
    m = np.zeros((6, 6), dtype=bool)
    m[1:5, 1:5] = True
    out = spotlight(grey_image(6, 6), m, width=1, dim=0.5)
    assert out[1, 1].tolist() == list(GT_COLOR)  # on the outline
    assert out[2, 2].tolist() == [100, 100, 100]  # inside, untouched
    assert out[0, 0].tolist() == [50, 50, 50]  # outside: 0.5 * 100


# --- heatmap ---------------------------------------------------------------------------


def test_heatmap_shape_and_monotone_brightness():
    prob = np.linspace(0.0, 1.0, 256).reshape(16, 16)
    out = heatmap(prob)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # Rec. 601 luma along the ramp never goes down.
    luma = out.reshape(-1, 3).astype(float) @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luma) >= -0.5).all()
    assert luma[-1] - luma[0] > 150


def test_heatmap_clips_and_ignores_nan():
    out = heatmap(np.array([[-1.0, 0.0, np.nan], [1.0, 2.0, 0.5]]))
    assert out[0, 0].tolist() == out[0, 1].tolist() == out[0, 2].tolist()
    assert out[1, 0].tolist() == out[1, 1].tolist()
    assert out[0, 1].tolist() != out[1, 0].tolist()


# --- panel -------------------------------------------------------------------------------


def test_panel_size_grows_with_rows():
    image = grey_image(8, 8)
    one = panel(image, [row()], image_id=7, tile=64)
    two = panel(image, [row(), row()], image_id=7, tile=64)
    three = panel(image, [row(), row(), row()], image_id=7, tile=64)
    assert one.mode == "RGB"
    assert one.width == two.width == 3 * 64 + 2 * render._GAP + 2 * render._MARGIN
    assert one.height < two.height < three.height
    # Identical rows take identical room.
    assert three.height - two.height == two.height - one.height


def test_panel_tiles_follow_the_image_aspect_and_mask_resolution():
    # A 60x120 image with masks at a square 32x32 evaluation size: every tile is
    # 192 wide and 96 high.
    image = grey_image(60, 120)
    out = panel(image, [row(size=32)], tile=192)
    assert out.width == 3 * 192 + 2 * render._GAP + 2 * render._MARGIN
    with pytest.raises(ValueError, match="row 0"):
        bad = row()
        panel(image, [RowSpec(bad.caption, bad.gt, bad.pred[:4], bad.prob, 0.0, False, False)])


def test_panel_wraps_long_captions():
    image = grey_image(8, 8)
    short = panel(image, [row("the dog")], tile=64)
    long = panel(image, [row("the dog " * 30)], tile=64)
    assert long.height > short.height
    assert long.width == short.width


def test_panel_shows_the_tiles():
    image = grey_image(8, 8)
    out = np.asarray(panel(image, [row()], tile=64))
    # The prediction tile holds all three error colours (blended over the
    # washed-out image), and the heatmap tile both of its ends.
    for colour in (TP_COLOR, FP_COLOR, FN_COLOR):
        assert (np.abs(out.astype(int) - np.array(colour)).sum(axis=2) < 60).any()
    assert (out == GT_COLOR).all(axis=2).any()


def test_panel_with_the_bitmap_font_fallback(monkeypatch):
    # Old Pillow or no FreeType: the fixed bitmap font, which only encodes Latin-1.
    monkeypatch.setattr(render, "_font", lambda size: ImageFont.load_default_imagefont())
    out = panel(grey_image(8, 8), [row("le chien \u2192 \u72ac"), row(gt_nt=True, pred_nt=False)], tile=64)
    assert isinstance(out, Image.Image)


def test_panel_without_rows_still_has_header_and_legend():
    out = panel(grey_image(8, 8), [], tile=64)
    assert out.height > 2 * render._MARGIN


# --- gallery HTML -----------------------------------------------------------------------


def test_gallery_html_lists_everything_and_escapes():
    entries = [
        ("image 1: <b>bold</b> & co", "panels/img_0001.png"),
        ("image 2", "panels/img_0002.png"),
    ]
    metrics = {"cIoU": 0.5, "gIoU": 0.625, "Pr_0.5": 1 / 3, "n_samples": 12}
    page = gallery_html(entries, metrics, rule_text="no target when area < 0.2% <of image>")
    for _, path in entries:
        assert path in page
    for name in metrics:
        assert f"<th>{name}</th>" in page
    assert "<td>0.6250</td>" in page and "<td>0.3333</td>" in page and "<td>12</td>" in page
    assert "<b>bold</b>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    assert "&lt;of image&gt;" in page
    # Self-contained: no external stylesheet, script or URL.
    assert "<script" not in page and "<link" not in page and "http" not in page


def test_gallery_html_quotes_awkward_paths():
    page = gallery_html([("t", 'a dir/x"y#1.png')], {}, rule_text="")
    assert 'src="a%20dir/x%22y%231.png"' in page
