"""Bad params, section by section: wrong types, out-of-range values, unknown keys, cross-field conflicts.

Every case must fail at load time, before any work, with the dotted key and
the offending value in the message. tests/test_config.py holds the first
examples; this file walks every section of params.yaml (and the `launcher`
block), plus the conflicts only the loaded backbones can reveal (the real
preset's text length and patch size). tests/reliability/test_bad_params_stage.py
checks through the real stage entries that nothing is written before the error.
"""

from __future__ import annotations

import pytest
import torch

from jurassiglip.config import ConfigError, params_from_dict
from jurassiglip.data.synthetic import COLOURS, SHAPES
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import ModelSpec
from jurassiglip.model.towers import tiny_dinov3, tiny_siglip2_text

ALL_PAIRS = [f"{c} {s}" for c in COLOURS for s in SHAPES]

# (dotted key, value to set, fragment the message must hold; None = "<key> = <value!r>")
CASES = [
    # seed
    ("seed", "0", None), ("seed", 1.5, None), ("seed", -1, "seed = -1 must be in [0, 2**63)"),
    ("seed", True, "seed = True must be an integer"),
    # data
    ("data.source", "coco", None), ("data.grefs_path", 3, None), ("data.splits", "train", None),
    ("data.splits", [], "data.splits = [] must name at least one split"),
    ("data.splits", ["train", "val", "val"], "data.splits = ['train', 'val', 'val'] has duplicates"),
    ("data.splits", ["train", 1], "data.splits[1] = 1 must be a string"),
    ("data.train_split", "dev", "data.train_split = 'dev' must be one of data.splits"),
    ("data.val_split", "train", "data.val_split = 'train' must differ from data.train_split"),
    ("data.max_refs_per_split", -1, None), ("data.max_refs_per_split", 10.0, None),
    ("data.drop_no_target", "no", None), ("data.on_bad_image", "warn", None),
    # synthetic
    ("synthetic.seed", -3, "synthetic.seed = -3 must be >= 0"),
    ("synthetic.n_images", [10, 2], None),
    ("synthetic.n_images", {"train": 5, "val": 0, "test": 2}, "synthetic.n_images.val = 0 must be > 0"),
    ("synthetic.n_images", {"train": "5", "val": 2, "test": 2}, "synthetic.n_images.train = '5' must be an integer"),
    ("synthetic.n_images", {"train": 5, "val": 2}, "data.splits = 'test' has no size in synthetic.n_images"),
    ("synthetic.min_objects", 0, None), ("synthetic.max_objects", 9, None),
    ("synthetic.min_objects", 7, "synthetic.min_objects = 7 must be between 1 and max_objects (6)"),
    ("synthetic.min_side", 16, None), ("synthetic.min_side", 300, "between 32 and max_side (224)"),
    ("synthetic.refs_per_image", 0, None), ("synthetic.no_target_share", 1.0, None),
    ("synthetic.rle_share", -0.1, None), ("synthetic.novel_combos", "red triangle", None),
    ("synthetic.novel_combos", ["pink hexagon"], "synthetic.novel_combos = 'pink hexagon' must be '<colour> <shape>'"),
    ("synthetic.novel_combos", ALL_PAIRS, "must leave some colour-shape pairs for the training split"),
    # model
    ("model.preset", "huge", None), ("model.image_mean", "grey", None),
    ("model.image_mean", [0.5, 0.5], None), ("model.image_mean", [0.5, 0.5, 120.0], None),
    ("model.image_std", [0.2, 0.0, 0.2], None), ("model.tiny", 8, "model.tiny = 8 must be a mapping"),
    ("model.tiny.image_size", 0, None), ("model.tiny.patch_size", 0, None),
    ("model.tiny.image_size", 132, "model.tiny.image_size = 132 must be divisible by model.tiny.patch_size (8)"),
    ("model.tiny.vision_layers", "4", None), ("model.tiny.vision_heads", 0, None),
    ("model.tiny.vision_heads", 5, "model.tiny.vision_hidden = 64 must be divisible by model.tiny.vision_heads (5)"),
    ("model.tiny.text_heads", 3, "model.tiny.text_hidden = 64 must be divisible by model.tiny.text_heads (3)"),
    ("model.tiny.register_tokens", -1, None), ("model.tiny.text_max_len", 0, None),
    ("model.tiny.shared_dim", 32, "model.tiny.shared_dim = 32 must equal model.tiny.vision_hidden (64)"),
    ("model.tiny.fusion_heads", 3, "model.tiny.fusion_inner_dim = 128 must be divisible by model.tiny.fusion_heads"),
    ("model.tiny.head_hidden", -8, None),
    ("model.real.image_size", 0, None), ("model.real.vision_name", 5, None), ("model.real.text_max_len", -1, None),
    ("model.real.fusion_inner_dim", 770,
     "model.real.fusion_inner_dim = 770 must be divisible by model.real.fusion_heads"),
    # lora
    ("lora.r", 0, None), ("lora.r", -4, None), ("lora.r", 8.0, None), ("lora.alpha", 0, None),
    ("lora.alpha", "16", None), ("lora.dropout", 1.0, None), ("lora.dropout", -0.1, None),
    ("lora.targets", [], None), ("lora.targets", "q_proj", None),
    ("lora.targets", ["q_proj", 7], "lora.targets[1] = 7 must be a string"),
    # pretrain
    ("pretrain.epochs", 0, None), ("pretrain.batch_size", 1, None), ("pretrain.lr", 0.0, None),
    ("pretrain.lr", "1e-4", None), ("pretrain.weight_decay", -0.01, None), ("pretrain.patience", 0, None),
    ("pretrain.loss", "triplet", None), ("pretrain.lr_schedule", "step", None),
    ("pretrain.logit_scale_init", 5.0, "pretrain.logit_scale_init = 5.0 must be in [0, pretrain.logit_scale_max"),
    ("pretrain.logit_scale_init", -1.0, None), ("pretrain.max_val_batches", -1, None),
    ("pretrain.log_every", 0, None), ("pretrain.num_workers", -1, None),
    ("pretrain.micro_batch_size", -2, None),
    ("pretrain.micro_batch_size", 5, "pretrain.micro_batch_size = 5 must divide pretrain.batch_size (64)"),
    # finetune
    ("finetune.epochs", -1, None), ("finetune.batch_size", 0, None), ("finetune.lr", -3e-3, None),
    ("finetune.weight_decay", "none", None), ("finetune.patience", 0, None), ("finetune.dice_weight", -1.0, None),
    ("finetune.focal_weight", -0.5, None),
    ("finetune.focal_alpha", 1.5, None), ("finetune.focal_gamma", -2.0, None), ("finetune.lr_schedule", "linear", None),
    ("finetune.cache_features", 1, None), ("finetune.max_val_batches", -5, None), ("finetune.log_every", 0, None),
    ("finetune.num_workers", "0", None), ("finetune.no_target_weight", -1.0, None),
    # evaluate
    ("evaluate.splits", [], None), ("evaluate.splits", ["val", "val"], None),
    ("evaluate.splits", ["val", "testB"], "evaluate.splits = 'testB' is not built"),
    ("evaluate.resolution", "native", None), ("evaluate.resolution", 0, None),
    ("evaluate.resolution", 480.5, "evaluate.resolution = 480.5 has the wrong type"),
    ("evaluate.mask_threshold", 0.0, None), ("evaluate.no_target_rule", "volume", None),
    ("evaluate.no_target_min_area", 1.0, None), ("evaluate.no_target_threshold", 1.5, None),
    ("evaluate.batch_size", 0, None),
    # render
    ("render.split", "testA", "render.split = 'testA' is not built"),
    ("render.split", "train", "render.split = 'train' is not evaluated (evaluate.splits"),
    ("render.n_images", 0, None), ("render.n_images", "8", None), ("render.max_captions", -1, None),
    # tracking
    ("tracking.experiment", "", None), ("tracking.experiment", 7, None),
    # launcher
    ("launcher.command", "", None), ("launcher.command", 3, None),
    ("launcher.command", "python -m stages.seg_finetune", "must not contain -m"),
]


def _set(tree: dict, key: str, value) -> None:
    *path, leaf = key.split(".")
    for part in path:
        tree = tree[part]
    tree[leaf] = value


def _error(tree: dict) -> str:
    with pytest.raises(ConfigError) as info:
        params_from_dict(tree)
    return str(info.value)


def test_every_section_has_cases(params_dict):
    covered = {key.split(".")[0] for key, _, _ in CASES}
    assert covered == set(params_dict)  # a new section of params.yaml needs its bad-value cases here


@pytest.mark.parametrize("key, value, fragment", CASES, ids=[f"{k}={v!r}"[:60] for k, v, _ in CASES])
def test_bad_value_names_key_and_value(params_dict, key, value, fragment):
    _set(params_dict, key, value)
    message = _error(params_dict)
    assert (fragment or f"{key} = {value!r}") in message


@pytest.mark.parametrize("section", ["", "model.tiny", "model.real", "launcher", "synthetic", "evaluate"])
def test_unknown_key_named_with_its_section(params_dict, section):
    node = params_dict
    for part in filter(None, section.split(".")):
        node = node[part]
    node["tpyo"] = 1
    where = f"{section}.tpyo" if section else "tpyo"
    assert f"{where}: unknown key" in _error(params_dict)


@pytest.mark.parametrize("section", ["seed", "launcher", "tracking"])
def test_missing_section_named(params_dict, section):
    del params_dict[section]
    assert f"{section}: missing key" in _error(params_dict)


def test_loss_without_any_term(params_dict):
    params_dict["finetune"].update(dice_weight=0.0, focal_weight=0.0)
    assert "finetune.dice_weight = 0.0 and focal_weight cannot both be 0" in _error(params_dict)


def test_no_target_head_rule_needs_a_trained_head(params_dict):
    params_dict["evaluate"]["no_target_rule"] = "head"
    params_dict["finetune"]["no_target_weight"] = 0.0
    assert "evaluate.no_target_rule = 'head' needs a trained no-target head" in _error(params_dict)


def test_whole_file_that_is_not_a_mapping():
    assert "params = ['seed', 0] must be a mapping" in _error(["seed", 0])


# -- conflicts only the loaded backbones can reveal (model.real with local checkpoints) ------------


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory):
    """A tiny DINOv3 (patch 8) and a tiny SigLIP2 text tower (12 positions) saved like hub checkpoints."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    tiny_dinov3(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, patch_size=8, image_size=32,
                num_register_tokens=4).save_pretrained(root / "vision")
    tiny_siglip2_text(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                      max_position_embeddings=12, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3).save_pretrained(root / "text")
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from jurassiglip.data.tokenizer import build_word_tokenizer, load_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_word_tokenizer(["the red circle", "all blue shapes"], folder)
    return load_tokenizer(folder)


def _real_spec(pretrained_dirs, params_dict, tokenizer, **arch):
    params_dict["model"]["preset"] = "real"
    params_dict["model"]["real"].update(vision_name=str(pretrained_dirs / "vision"),
                                        text_name=str(pretrained_dirs / "text"), shared_dim=32, **arch)
    return ModelSpec.from_params(params_from_dict(params_dict), tokenizer)


@pytest.mark.parametrize("arch, fragment", [
    ({"image_size": 32, "text_max_len": 64}, "model.real.text_max_len = 64 exceeds the 12 positions of"),
    ({"image_size": 36, "text_max_len": 12}, "model.real.image_size = 36 is not divisible by the patch size 8 of"),
])
def test_real_preset_conflicts_with_its_checkpoints_are_named(pretrained_dirs, params_dict, tokenizer, arch,
                                                             fragment):
    spec = _real_spec(pretrained_dirs, params_dict, tokenizer, **arch)
    with pytest.raises(ValueError, match=fragment):
        build_model(spec)


def test_real_preset_that_fits_its_checkpoints_builds(pretrained_dirs, params_dict, tokenizer):
    model = build_model(_real_spec(pretrained_dirs, params_dict, tokenizer, image_size=32, text_max_len=12))
    assert model.grid == 4


def test_lora_targets_missing_from_a_tower_are_named(params_dict, tokenizer):
    params_dict["lora"]["targets"] = ["qkv"]
    spec = ModelSpec.from_params(params_from_dict(params_dict), tokenizer)
    with pytest.raises(ValueError, match=r"lora.targets = \['qkv'\]: none of the LoRA targets"):
        build_model(spec)
