"""The checkpoint format (format 2): what it stores, what it refuses, and loading offline.

The real preset's rule (only what was trained is stored; the base towers come
from their folder or the local Hugging Face cache) is tested on tiny models
saved in the exact hub layouts (tests/real_format.py) and built through the
real-preset path; the real-size count is checked by formula.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from real_format import save_dinov3, save_siglip2
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from jurassiglip.model import checkpoint
from jurassiglip.config import params_from_dict
from jurassiglip.data.tokenizer import load_tokenizer, tokenize
from jurassiglip.model.build import build_model, model_from_checkpoint
from jurassiglip.model.spec import ModelSpec

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
CAPTIONS = ["the red circle", "all blue shapes", "the square on the left", "the largest triangle"]


def lora_count(r: int, shapes: list[tuple[int, int]]) -> int:
    """A LoRA pair on a Linear(in -> out) adds A (r x in) and B (out x r): r * (in + out)."""
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)


def trained_count(*, r: int, vision_hidden: int, vision_mlp: int, vision_layers: int, text_hidden: int,
                  text_layers: int, shared_dim: int, fusion_inner: int, head_hidden: int) -> int:
    """Parameters a real-preset checkpoint stores, from the published layer shapes.

    Vision (DINOv3 ViT with a gated MLP): LoRA on q, k, v, o (D -> D), gate and up (D -> mlp), down (mlp -> D).
    Text (SigLIP2): LoRA on q, k, v (E -> E) only. Then the projection E -> D (no bias), the fusion
    (2 LayerNorms on D, Q/K/V D -> inner and out inner -> D, no bias), the segmentation head
    (D -> hidden -> 1), the no-target head (LayerNorm on 2D, 2D -> hidden -> 1) and logit scale + bias.
    """
    d, e, inner, hidden = shared_dim, text_hidden, fusion_inner, head_hidden
    vision_layer = [(vision_hidden, vision_hidden)] * 4 + [(vision_hidden, vision_mlp)] * 2 \
        + [(vision_mlp, vision_hidden)]
    lora = vision_layers * lora_count(r, vision_layer) + text_layers * lora_count(r, [(e, e)] * 3)
    projection = e * d
    fusion = 2 * 2 * d + 3 * d * inner + inner * d
    head = d * hidden + hidden + hidden + 1
    no_target = 2 * (2 * d) + (2 * d) * hidden + hidden + hidden + 1
    return lora + projection + fusion + head + no_target + 2


def test_real_size_checkpoint_holds_3_4_million_trained_parameters():
    """ViT-S/16+ (384, SwiGLU 1536, 12 layers) + SigLIP2 base text (768, 12 layers), notebook sizes, r = 8."""
    fusion_and_head = 2 * 2 * 384 + 4 * 384 * 768 + 384 * 512 + 512 + 512 + 1
    assert fusion_and_head == 1_378_817  # SPEC §2
    count = trained_count(r=8, vision_hidden=384, vision_mlp=1536, vision_layers=12, text_hidden=768,
                          text_layers=12, shared_dim=384, fusion_inner=768, head_hidden=512)
    assert count == 1_378_817 + 768 * 384 + 395_777 + 2 + 12 * 70_656 + 12 * 36_864 == 3_359_748
    assert count * 4 < 14e6  # fp32 bytes, against 1.26 GB for a whole-model checkpoint


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return save_dinov3(root / "dinov3", hidden=32, image_size=64), save_siglip2(root / "siglip2", CAPTIONS)


@pytest.fixture(scope="module")
def real_spec(real_dirs):
    vision, text = real_dirs
    params = yaml.safe_load(PARAMS.read_text())
    params["model"]["preset"] = "real"
    params["model"]["real"].update(vision_name=str(vision), text_name=str(text), image_size=64, text_max_len=16,
                                   shared_dim=32, fusion_inner_dim=32, head_hidden=16)
    params["model"]["decoder"]["kind"] = "prototype"  # the head `trained_count` counts
    return ModelSpec.from_params(params_from_dict(params), load_tokenizer(text))


def trained_model(spec):
    """The real-preset model with every trainable weight moved off its initial value (LoRA B included);
    the base towers stay as their folders hold them."""
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or not name.startswith(("vision.backbone.", "text.backbone.")):
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def payload(spec, model, tokenizer, stage="seg_finetune", no_target=True):
    return {"spec": spec, "model": model, "tokenizer": tokenizer, "stage": stage,
            "heads": {"segmentation": stage == "seg_finetune", "no_target": no_target}}


def inputs(tokenizer, spec):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)  # (B, 3, S, S)
    ids, mask = tokenize(tokenizer, CAPTIONS[:2], spec.arch.text_max_len)  # (B, L)
    return images, ids, mask


@pytest.fixture(scope="module")
def saved(real_spec, real_dirs, tmp_path_factory):
    model = trained_model(real_spec)
    tokenizer = load_tokenizer(real_dirs[1])
    path = tmp_path_factory.mktemp("ckpt") / checkpoint.BEST
    checkpoint.save(path, payload(real_spec, model, tokenizer))
    return path, model, tokenizer


def test_real_preset_stores_exactly_the_trainable_weights(saved, real_spec):
    path, model, _ = saved
    trainable = set()
    for choose in (lambda: model.trainable_for_pretrain(with_logit_bias=True),
                   lambda: model.trainable_for_finetune(with_no_target=True)):
        choose()
        trainable |= {name for name, p in model.named_parameters() if p.requires_grad}
    tensors = load_tensors(path.read_bytes())
    assert set(tensors) == {f"model.{name}" for name in trainable}
    assert any("lora_" in name for name in trainable) and "logit_bias" in trainable
    assert sum(t.numel() for t in tensors.values()) == trained_count(
        r=8, vision_hidden=32, vision_mlp=64, vision_layers=2, text_hidden=48, text_layers=2, shared_dim=32,
        fusion_inner=32, head_hidden=16)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, model.state_dict()[name.removeprefix("model.")]), name


def test_metadata_names_the_bases_the_stage_and_the_heads(saved, real_spec, real_dirs):
    path, _, _ = saved
    document = json.loads(checkpoint._metadata(path.read_bytes())[checkpoint.META_KEY])
    vision, text = (str(d) for d in real_dirs)
    assert document == {
        "format": 2, "stage": "seg_finetune", "heads": {"segmentation": True, "no_target": True},
        "spec": real_spec.to_dict(), "resume": None,
        "base": {"embedded": False, "vision": {"name": vision, "revision": None},
                 "text": {"name": text, "revision": None}},
        "tokenizer": {"name": text, "revision": None},  # a reference: SigLIP2's tokenizer.json is 34 MB
    }


def test_real_preset_checkpoint_rebuilds_the_same_model_offline(saved, real_spec, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline is the default when loading a checkpoint
    path, model, tokenizer = saved
    rebuilt, rebuilt_tokenizer, spec = model_from_checkpoint(path)
    assert spec == real_spec
    images, ids, mask = inputs(rebuilt_tokenizer, spec)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images, ids, mask), model(images, ids, mask))
        merged, _, _ = model_from_checkpoint(path, merge=True)
        assert torch.allclose(merged.eval()(images, ids, mask), model(images, ids, mask), atol=1e-5)


def rewrite(path, out, edit_tensors=None, edit_document=None):
    """A copy of a checkpoint with its tensors or metadata changed (what a foreign writer could produce)."""
    blob = path.read_bytes()
    tensors = load_tensors(blob)
    document = json.loads(checkpoint._metadata(blob)[checkpoint.META_KEY])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_document:
        edit_document(document)
    out.write_bytes(save_tensors(tensors, metadata={checkpoint.META_KEY: json.dumps(document)}))
    return out


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: d["spec"].pop("vocab_size"), r"model spec: missing \['vocab_size'\]"),
    (lambda d: d["spec"]["arch"].update(depth=3), r"model spec arch \(real\): unknown \['depth'\]"),
    (lambda d: d["spec"].update(preset="huge"), r"model spec preset 'huge': expected one of \['real', 'tiny'\]"),
    (lambda d: d["spec"]["lora"].pop("r"), r"model spec lora: missing \['r'\]"),
])
def test_a_spec_that_does_not_describe_a_model_names_the_file_and_the_key(saved, tmp_path, damage, fragment):
    path, _, _ = saved
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_document=damage)
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{bad}: {fragment}"):
        checkpoint.load(bad)


def test_missing_base_is_one_message_saying_how_to_get_it(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _, _ = saved

    def hub_base(document):
        document["spec"]["arch"]["vision_name"] = "facebook/dinov3-vits16plus-pretrain-lvd1689m"
        document["base"]["vision"] = {"name": "facebook/dinov3-vits16plus-pretrain-lvd1689m", "revision": "0123abc"}

    moved = rewrite(path, tmp_path / "hub.safetensors", edit_document=hub_base)
    with pytest.raises(checkpoint.CheckpointError) as err:
        model_from_checkpoint(moved)
    message = str(err.value)
    assert message.startswith(f"{moved}: needs the base checkpoints facebook/dinov3-vits16plus-pretrain-lvd1689m "
                              "at revision 0123abc")
    assert "`hf download facebook/dinov3-vits16plus-pretrain-lvd1689m --revision 0123abc`" in message
    assert "hf auth login" in message and "HF_HUB_OFFLINE=0" in message and "\n" not in message


def test_missing_local_base_folder_is_named(saved, real_dirs, tmp_path):
    path, _, _ = saved
    vision = real_dirs[0]
    gone = vision.with_name("dinov3-gone")
    shutil.move(vision, gone)
    try:
        with pytest.raises(checkpoint.CheckpointError, match=rf"{path}: needs the base checkpoints {vision} "
                                                             r"\(a local folder when trained\).*put that folder back"):
            model_from_checkpoint(path)
    finally:
        shutil.move(gone, vision)


@pytest.mark.parametrize("damage, fragment", [
    (lambda t: t.pop(min(k for k in t if k.startswith("model.vision.") and "lora_B" in k)),
     r"missing \['vision\.\S*lora_B\S*'\] \(1 in all\)"),
    (lambda t: t.update({"model.head.mlp.0.weight": torch.zeros(3, 3)}), "size mismatch for head.mlp.0.weight"),
    (lambda t: t.update({"model.vision.backbone.extra": torch.zeros(1)}), r"unexpected \['vision.backbone.extra'\]"),
])
def test_weights_that_do_not_fit_name_the_file(saved, tmp_path, damage, fragment):
    path, _, _ = saved
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_tensors=damage)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{bad}: weights do not fit the model.*{fragment}"):
        model_from_checkpoint(bad)


def test_tiny_preset_embeds_the_whole_model_and_its_tokenizer(micro_data, micro_params, tmp_path):
    spec = ModelSpec.from_params(params_from_dict(micro_params), load_tokenizer(micro_data / "tokenizer"))
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    torch.manual_seed(0)
    model = build_model(spec)
    path = tmp_path / checkpoint.BEST
    checkpoint.save(path, payload(spec, model, tokenizer, stage="contrastive_pretrain", no_target=False))
    loaded = checkpoint.load(path)
    assert set(loaded["model"]) == set(model.state_dict())  # towers included: they exist nowhere else
    assert loaded["base"] == {"embedded": True} and loaded["stage"] == "contrastive_pretrain"
    assert loaded["heads"] == {"segmentation": False, "no_target": False}
    assert set(loaded["tokenizer"]["files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert "optimizer" not in loaded  # a best checkpoint is not resumable


def test_latest_round_trips_optimizer_rng_and_state(micro_data, micro_params, tmp_path):
    spec = ModelSpec.from_params(params_from_dict(micro_params), load_tokenizer(micro_data / "tokenizer"))
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.AdamW(model.trainable_for_finetune(), lr=1e-3, weight_decay=0.01)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    state = {"epoch": 1, "best_val": 0.5, "best_epoch": 1, "bad_epochs": 0,
             "history": [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.5}]}
    rng = torch.get_rng_state()
    checkpoint.save(tmp_path / checkpoint.LATEST, {
        **payload(spec, model, tokenizer), "optimizer": optimizer.state_dict(), "state": state,
        "start_val_loss": 0.9, "fingerprint": "abc", "torch_rng": rng, "cuda_rng": None})
    loaded = checkpoint.load(tmp_path / checkpoint.LATEST)
    assert loaded["state"] == state and loaded["start_val_loss"] == 0.9 and loaded["fingerprint"] == "abc"
    assert torch.equal(loaded["torch_rng"], rng) and loaded["cuda_rng"] is None
    expected = optimizer.state_dict()
    assert loaded["optimizer"]["param_groups"] == json.loads(json.dumps(expected["param_groups"]))
    assert loaded["optimizer"]["state"].keys() == expected["state"].keys()
    for index, values in expected["state"].items():
        for name, value in values.items():
            assert torch.equal(loaded["optimizer"]["state"][index][name], value), (index, name)
    again = torch.optim.AdamW(model.trainable_for_finetune(), lr=1e-3, weight_decay=0.01)
    again.load_state_dict(loaded["optimizer"])  # what fit does on resume
    assert checkpoint.load_latest(tmp_path / checkpoint.LATEST, "other") is None  # other params: start over
    assert np.isclose(again.param_groups[0]["weight_decay"], 0.01)


HUB_SCRIPT = """
import json, sys, torch, yaml
from jurassiglip.model import checkpoint
from jurassiglip.config import params_from_dict
from jurassiglip.data.tokenizer import load_tokenizer, tokenize
from jurassiglip.model.build import build_model, model_from_checkpoint
from jurassiglip.model.spec import ModelSpec

out, params = sys.argv[1], yaml.safe_load(open(sys.argv[2]))
params["model"]["preset"] = "real"
params["model"]["real"].update(vision_name="jurassiglip-test/dinov3", text_name="jurassiglip-test/siglip2",
                               image_size=64, text_max_len=16, shared_dim=32, fusion_inner_dim=32, head_hidden=16)
tokenizer = load_tokenizer("jurassiglip-test/siglip2", local_files_only=True)
spec = ModelSpec.from_params(params_from_dict(params), tokenizer)
torch.manual_seed(0)
model = build_model(spec, local_files_only=True).eval()
checkpoint.save(out, {"spec": spec, "model": model, "tokenizer": tokenizer, "stage": "seg_finetune",
                      "heads": {"segmentation": True, "no_target": True}})
rebuilt, rebuilt_tokenizer, _ = model_from_checkpoint(out)
ids, mask = tokenize(rebuilt_tokenizer, ["the red circle"], 16)
images = torch.zeros(1, 3, 64, 64)
same = bool(torch.equal(rebuilt.eval()(images, ids, mask), model(images, ids, mask)))
print(json.dumps({"base": checkpoint.load(out)["base"], "same": same}))
"""


def hub_cache_entry(cache, repo_id, folder, commit):
    """`folder` laid out as huggingface_hub caches a download of `repo_id` at `commit`."""
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_hub_bases_are_recorded_with_their_commit_and_loaded_from_the_cache_offline(real_dirs, tmp_path):
    """A hub id records the commit transformers loaded; the checkpoint loads from the cache with no network."""
    import os
    import subprocess
    import sys

    commits = {"dinov3": "1" * 40, "siglip2": "2" * 40}
    for folder in real_dirs:
        hub_cache_entry(tmp_path / "cache", f"jurassiglip-test/{folder.name}", folder, commits[folder.name])
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path / checkpoint.BEST), str(PARAMS)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"same": True, "base": {
        "embedded": False, "vision": {"name": "jurassiglip-test/dinov3", "revision": commits["dinov3"]},
        "text": {"name": "jurassiglip-test/siglip2", "revision": commits["siglip2"]}}}


def test_a_header_length_starting_with_the_pickle_opcode_is_still_read(saved, tmp_path):
    """A safetensors header length whose first byte is 0x80 (pickle's PROTO opcode) is not a torch pickle."""
    path, _, _ = saved
    for pad in range(256):
        out = rewrite(path, tmp_path / f"pad{pad}.safetensors", edit_document=lambda d: d.update(padding="x" * pad))
        if out.read_bytes()[0] == 0x80:
            break
    assert out.read_bytes()[0] == 0x80
    assert checkpoint.load(out)["stage"] == "seg_finetune"
