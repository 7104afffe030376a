"""All five stages end to end on a micro config, through their real entry points."""

from __future__ import annotations

import importlib
import json

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from jurassiglip.runtime.paths import STAGES
from jurassiglip.runtime.tracking import tracking_uri

METRIC_KEYS = ["cIoU", "gIoU", "Pr_0.5", "Pr_0.6", "Pr_0.7", "Pr_0.8", "Pr_0.9", "N_acc", "T_acc"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, micro_params):
    """Run build_manifest -> ... -> render_val once in a fresh folder; yield the folder."""
    root = tmp_path_factory.mktemp("pipeline")
    (root / "params.yaml").write_text(yaml.safe_dump(micro_params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "JURASSIGLIP_PARENT_RUN_ID"):
            mp.delenv(var, raising=False)
        for name in STAGES:
            importlib.import_module(f"stages.{name}").main()
        yield root


@pytest.mark.slow
def test_every_output_exists(pipeline):
    expected = [
        "build_manifest/manifest/samples.parquet", "build_manifest/manifest/images.npy",
        "build_manifest/tokenizer/tokenizer.json", "build_manifest/metrics.json",
        "contrastive_pretrain/checkpoints/best.safetensors", "contrastive_pretrain/checkpoints/latest.safetensors",
        "contrastive_pretrain/plots/loss.csv", "contrastive_pretrain/metrics.json",
        "seg_finetune/checkpoints/best.safetensors", "seg_finetune/features/patches.npy", "seg_finetune/plots/loss.csv",
        "evaluate/samples.parquet", "evaluate/samples.csv", "evaluate/metrics.json",
        "render_val/gallery/index.html",
    ]
    missing = [p for p in expected if not (pipeline / "data" / p).exists()]
    assert not missing
    assert len(list((pipeline / "data/render_val/gallery").glob("*.png"))) == 2


@pytest.mark.slow
def test_metrics_file_has_every_metric(pipeline, micro_params):
    metrics = json.loads((pipeline / "data/evaluate/metrics.json").read_text())
    table = pd.read_csv(pipeline / "data/evaluate/samples.csv")
    manifest = pd.read_parquet(pipeline / "data/build_manifest/manifest/samples.parquet")
    for split in ("val", "test"):
        block = metrics[split]
        for section in (block, block["baseline_shuffled_text"], block["baseline_union"]):
            assert set(METRIC_KEYS) <= set(section)
        assert {"single", "multi", "novel"} <= set(block)
        # the headline numbers are the per-sample table's, by the GRES definitions (docs/metrics.md)
        rows = table[table["split"] == split]
        assert block["n_samples"] == len(rows) == (manifest["split"] == split).sum()
        in_split = manifest[manifest["split"] == split]
        assert block["n_no_target"] == rows["gt_nt"].sum() == in_split["no_target"].sum()
        assert block["cIoU"] == pytest.approx(rows["I"].sum() / rows["U"].sum())
        assert block["gIoU"] == pytest.approx(rows["IoU"].mean())
        assert block["N_acc"] == pytest.approx((rows["pred_nt"] & rows["gt_nt"]).sum() / rows["gt_nt"].sum())
        shuffled = block["baseline_shuffled_text"]
        assert shuffled["cIoU"] == pytest.approx(rows["shuffled_I"].sum() / rows["shuffled_U"].sum())
        assert block["baseline_union"]["gIoU"] == pytest.approx(rows["union_IoU"].mean())
        single = rows[rows["kind"] == "single"]
        assert block["single"]["cIoU"] == pytest.approx(single["I"].sum() / single["U"].sum())
    assert metrics["no_target_min_area"] == micro_params["evaluate"]["no_target_min_area"]


@pytest.mark.slow
def test_per_sample_table_covers_every_evaluated_caption(pipeline):
    table = pd.read_parquet(pipeline / "data/evaluate/samples.parquet")
    samples = pd.read_parquet(pipeline / "data/build_manifest/manifest/samples.parquet")
    evaluated = samples[samples["split"].isin(["val", "test"])]
    assert sorted(table["sample_id"]) == sorted(evaluated["sample_id"])
    assert {"sentence", "kind", "gt_nt", "pred_nt"} <= set(table.columns)
    assert table["IoU"].between(0, 1).all()
    assert (table["I"] <= table["U"]).all()


@pytest.mark.slow
def test_one_mlflow_run_per_stage_under_one_parent(pipeline):
    client = MlflowClient(tracking_uri(pipeline))
    experiment = client.get_experiment_by_name("jurassiglip")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage != ''")
    assert sorted(r.data.tags["stage"] for r in runs) == sorted(STAGES)
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    evaluate = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert "val/cIoU" in evaluate.data.metrics and "val/baseline_union/gIoU" in evaluate.data.metrics
    pretrain = next(r for r in runs if r.data.tags["stage"] == "contrastive_pretrain")
    assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "val_loss")] == [1]
