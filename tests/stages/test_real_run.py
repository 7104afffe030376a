"""The real run, end to end, on real-format fixtures: `model.preset=real` and `data.source=grefcoco` through DVC.

What a researcher with the gRefCOCO files and the two pretrained checkpoints
does, with every file in its real layout but tiny (tests/real_format.py):
a DINOv3ViTModel and a full Siglip2Model saved with `save_pretrained`, a
SigLIP2-format tokenizer, and gRefCOCO-format refs with the four official
splits. Hugging Face is forced offline for the whole test: the real preset
loads its towers from the folders `model.real.*_name` point at, and
`jurassiglip predict` rebuilds the model from its small checkpoint and those
folders alone. A second run as a DVC experiment reads a refs file without
testA/testB, as gRefCOCO's first release shipped it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from jurassiglip.runtime.paths import STAGES
from real_format import first_release, save_dinov3, save_siglip2, write_grefcoco

REPO = Path(__file__).resolve().parents[2]
SPLITS = {"train": 16, "val": 6, "testA": 4, "testB": 4}
BEST = Path("data/seg_finetune/checkpoints/best.safetensors")

pytestmark = pytest.mark.slow


def _run(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def real_project(tmp_path_factory, micro_params):
    """This project in a scratch git repository on the real preset and gRefCOCO-format files, after `dvc repro`."""
    models = tmp_path_factory.mktemp("hf")
    root = tmp_path_factory.mktemp("real_project")
    grefcoco = write_grefcoco(root / "data" / "grefcoco", SPLITS)  # the default data.* paths
    first_release(grefcoco / "grefs(unc).json", grefcoco / "grefs_first_release.json")
    captions = [s["sent"] for r in json.loads((grefcoco / "grefs(unc).json").read_text()) for s in r["sentences"]]
    vision = save_dinov3(models / "dinov3-vits16plus", hidden=32, image_size=64)
    text = save_siglip2(models / "siglip2-base-patch16-512", captions)

    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "jurassiglip", ".dvc"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache", "*.lock"))
    params = json.loads(json.dumps(micro_params))  # a deep copy of the session's dict
    params["model"]["preset"] = "real"
    params["model"]["real"].update(image_size=64, vision_name=str(vision), text_name=str(text), shared_dim=32,
                                   fusion_inner_dim=32, fusion_heads=4, head_hidden=32)
    params["data"]["source"] = "grefcoco"
    params["pretrain"].update(epochs=2, micro_batch_size=4)  # the real preset's gradient cache, in passes of 4
    params["finetune"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "JURASSIGLIP_PARENT_RUN_ID", "JURASSIGLIP_PARAMS"):
        env.pop(var, None)
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    _run(root, env, "git", "init", "-q")
    _run(root, env, "git", "add", "-A")
    _run(root, env, *git, "commit", "-qm", "real preset on gRefCOCO-format files")
    out = _run(root, env, sys.executable, "-m", "dvc", "repro")
    assert all(f"Running stage '{stage}'" in out.stdout for stage in STAGES), out.stdout
    _run(root, env, "git", "add", "-A")
    _run(root, env, *git, "commit", "-qm", "results")
    return root, env, vision, text


def test_dvc_repro_runs_all_stages_and_scores_the_four_splits(real_project):
    root, _, _, _ = real_project
    built = json.loads((root / "data/build_manifest/metrics.json").read_text())
    assert set(built["samples_per_split"]) == set(SPLITS) and built["splits_missing"] == 0
    scored = json.loads((root / "data/evaluate/metrics.json").read_text())
    assert {"val", "testA", "testB"} <= set(scored)
    source = json.loads((root / "data/build_manifest/source/source.json").read_text())
    assert source["source"] == "grefcoco" and len(source["files"]) == 2


def test_the_checkpoint_holds_what_was_trained_and_names_its_bases(real_project):
    root, _, vision, text = real_project
    with safe_open(root / BEST, "pt") as handle:
        keys = list(handle.keys())
        meta = handle.metadata()
    base_weights = [k for k in keys if ".backbone." in k and "lora_" not in k]
    assert keys and not base_weights, base_weights[:5]
    assert any("lora_" in k for k in keys) and any("fusion" in k for k in keys)
    described = json.dumps(meta)
    assert str(vision) in described and str(text) in described and "seg_finetune" in described
    base_bytes = sum(p.stat().st_size for p in (*vision.glob("*.safetensors"), *text.glob("model.safetensors")))
    assert (root / BEST).stat().st_size < base_bytes


def test_predict_works_offline_from_the_checkpoint_and_the_local_bases(real_project, tmp_path):
    root, env, _, _ = real_project
    image = next((root / "data/grefcoco/images").iterdir())
    cli = Path(sys.executable).parent / "jurassiglip"
    out = subprocess.run([str(cli), "predict", "--checkpoint", str(root / BEST), "--image", str(image),
                          "--text", "the red circle", "--text", "all squares", "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["the red circle", "all squares"]


def test_an_experiment_on_the_first_release_without_testa_testb_completes(real_project):
    root, env, _, _ = real_project
    try:
        _run(root, env, sys.executable, "-m", "dvc", "exp", "run", "-n", "first-release",
             "-S", "data.grefs_path=data/grefcoco/grefs_first_release.json")
        built = json.loads((root / "data/build_manifest/metrics.json").read_text())
        assert set(built["samples_per_split"]) == {"train", "val"} and built["splits_missing"] == 2
        scored = json.loads((root / "data/evaluate/metrics.json").read_text())
        assert "val" in scored and "testA" not in scored and "testB" not in scored
    finally:
        _run(root, env, "git", "checkout", "-q", "--", ".")
