"""evaluate_split: the batched inference path against a per-sample reference, and batch-size independence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from jurassiglip.inference import metrics

from jurassiglip.model import checkpoint
from jurassiglip.config import params_from_dict
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import load_tokenizer, tokenize
from jurassiglip.inference.evaluate import evaluate_split, split_metrics
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import ModelSpec
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.predictor import Predictor


@pytest.fixture(scope="module")
def setup(micro_data, micro_params, tmp_path_factory):
    params = params_from_dict(micro_params)
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    spec = ModelSpec.from_params(params, tokenizer)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / checkpoint.BEST
    checkpoint.save(path, {"spec": spec, "model": build_model(spec), "tokenizer": tokenizer, "stage": "seg_finetune",
                           "heads": {"segmentation": True, "no_target": True}})
    decision = Decision.from_config(params.evaluate)
    predictor = Predictor.from_checkpoint(path, decision, device="cpu")
    return predictor, Manifest.load(micro_data / "manifest", predictor.image_size, "test")


def reference(predictor: Predictor, manifest: Manifest, sample_id: int) -> tuple[int, int, bool]:
    """I, U and the verdict of one sample, one caption at a time straight from the model (no Predictor.infer)."""
    row = manifest.samples.iloc[sample_id]
    model, decision = predictor.model, predictor.decision
    with torch.no_grad():
        image = torch.from_numpy(np.array(manifest.images[[int(row["image_index"])]])).permute(0, 3, 1, 2)
        patches, _ = model.encode_image(image)
        ids, mask = tokenize(predictor.tokenizer, [row["sentence"]], predictor.text_max_len)
        tokens, mask, _ = model.encode_text(ids, mask)
        logits, nt_logit = model.decode(patches, tokens, mask, image)  # (1, 1, S, S), (1,)
        size = (int(row["height"]), int(row["width"]))
        prob = torch.sigmoid(F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False))[0, 0]
    pred = (prob > decision.mask_threshold).numpy()
    pred_nt = bool(torch.sigmoid(nt_logit.float())[0] > decision.no_target_threshold)
    i, u = metrics.intersection_union(pred, manifest.original_target(sample_id), pred_nt, bool(row["no_target"]))
    return i, u, pred_nt


def test_evaluation_matches_a_per_sample_reference(setup):
    predictor, manifest = setup
    assert predictor.decision.no_target_rule == "head"
    table = evaluate_split(predictor, manifest, "val", resolution="original", batch_size=64, seed=0)
    for sample_id in table["sample_id"].iloc[::5]:
        row = table.set_index("sample_id").loc[sample_id]
        assert (row["I"], row["U"], row["pred_nt"]) == reference(predictor, manifest, int(sample_id))


@pytest.mark.parametrize("resolution", ["original", 48])
def test_batch_size_changes_no_metric(setup, resolution):
    predictor, manifest = setup
    tables = [evaluate_split(predictor, manifest, "val", resolution=resolution, batch_size=b, seed=0)
              for b in (1, 16, 10_000)]  # one image per pass ... the whole split in one pass
    for table in tables[1:]:
        assert split_metrics(table) == split_metrics(tables[0])
        pd.testing.assert_frame_equal(table.drop(columns="nt_prob"), tables[0].drop(columns="nt_prob"))
        np.testing.assert_allclose(table["nt_prob"], tables[0]["nt_prob"], rtol=0, atol=1e-6)  # float noise only
