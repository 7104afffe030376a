"""params.yaml loading: typed, complete, validated before any work, errors naming key and value."""

from __future__ import annotations

import copy

import pytest
import yaml

from jurassiglip.config import ConfigError, flatten, load_params, params_from_dict


def test_repository_params_load_typed(params_dict):
    params = params_from_dict(params_dict)
    assert params.lora.r == params_dict["lora"]["r"]
    assert isinstance(params.pretrain.lr, float)
    assert params.model.arch is params.model.tiny
    assert flatten(params.to_dict())["lora.r"] == params.lora.r


def test_real_preset_switch(params_dict):
    params_dict["model"]["preset"] = "real"
    params = params_from_dict(params_dict)
    assert params.model.arch.shared_dim == 384
    assert params.model.arch.vision_name.startswith("facebook/dinov3")


def test_the_real_preset_and_grefcoco_pick_the_notebook_recipe_and_the_official_splits(params_dict, tmp_path):
    params_dict["model"]["preset"] = "real"
    params_dict["data"].update(source="grefcoco", grefs_path=str(tmp_path), instances_path=str(tmp_path),
                               images_dir=str(tmp_path))
    params = params_from_dict(params_dict)
    # SPEC §3 / §8: stage 1 lr 1e-4 for up to 20 epochs, stage 2 lr 3e-4; batch 64 in passes of 16
    assert (params.pretrain.lr, params.pretrain.epochs, params.finetune.lr) == (1e-4, 20, 3e-4)
    assert (params.pretrain.batch_size, params.pretrain.micro_batch_size) == (64, 16)
    assert params.data.splits == ["train", "val", "testA", "testB"]
    assert params.evaluate.splits == ["val", "testA", "testB"]
    assert params.model.real.text_max_len == 64 and params.model.real.text_tower_mask is False


def test_a_plain_value_applies_to_every_option_and_one_option_can_change_alone(params_dict):
    params_dict["pretrain"]["lr"] = 5e-4  # what `-S pretrain.lr=5e-4` writes
    assert params_from_dict(params_dict).pretrain.lr == 5e-4
    params_dict["pretrain"]["lr"] = {"tiny": 7e-3, "real": 1e-4}  # `-S pretrain.lr.tiny=7e-3`
    assert params_from_dict(params_dict).pretrain.lr == 7e-3


def test_a_per_choice_mapping_must_name_every_option(params_dict):
    params_dict["pretrain"]["lr"] = {"tiny": 7e-3}
    assert "pretrain.lr = {'tiny': 0.007} must be a number" in _error(params_dict)


def test_an_unknown_choice_is_named_before_anything_is_picked(params_dict):
    params_dict["model"]["preset"] = "huge"
    assert "model.preset = 'huge' must be one of ['tiny', 'real']" in _error(params_dict)


def _error(params_dict: dict) -> str:
    with pytest.raises(ConfigError) as info:
        params_from_dict(params_dict)
    return str(info.value)


@pytest.mark.parametrize("section", ["data", "synthetic", "model", "lora", "pretrain", "finetune", "evaluate",
                                     "render", "tracking", "launcher"])
def test_unknown_and_missing_keys_named(params_dict, section):
    broken = copy.deepcopy(params_dict)
    broken[section]["surprise"] = 1
    assert f"{section}.surprise: unknown key" in _error(broken)
    broken = copy.deepcopy(params_dict)
    first = next(iter(broken[section]))
    del broken[section][first]
    assert f"{section}.{first}: missing key" in _error(broken)


@pytest.mark.parametrize("key, value, fragment", [
    ("lora.r", "8", "lora.r = '8' must be an integer"),
    ("lora.r", 0, "lora.r = 0 must be > 0"),
    ("lora.r", True, "lora.r = True must be an integer"),
    ("lora.dropout", 1.5, "lora.dropout = 1.5"),
    ("pretrain.lr", "fast", "pretrain.lr = 'fast' must be a number"),
    ("pretrain.batch_size", 1, "pretrain.batch_size = 1"),
    ("pretrain.loss", "triplet", "pretrain.loss = 'triplet' must be one of"),
    ("finetune.focal_alpha", 2.0, "finetune.focal_alpha = 2.0"),
    ("finetune.cache_features", "yes", "finetune.cache_features = 'yes' must be true or false"),
    ("data.source", "coco", "data.source = 'coco' must be one of"),
    ("data.on_bad_image", "ignore", "data.on_bad_image = 'ignore'"),
    ("data.val_split", "valid", "data.val_split = 'valid' must be one of data.splits"),
    ("evaluate.resolution", "native", "evaluate.resolution = 'native'"),
    ("evaluate.resolution", -5, "evaluate.resolution = -5"),
    ("evaluate.mask_threshold", 1.0, "evaluate.mask_threshold = 1.0"),
    ("evaluate.no_target_rule", "size", "evaluate.no_target_rule = 'size' must be one of"),
    ("evaluate.no_target_threshold", 0.0, "evaluate.no_target_threshold = 0.0 must be in (0, 1)"),
    ("finetune.no_target_weight", -1.0, "finetune.no_target_weight = -1.0 must be >= 0"),
    ("evaluate.splits", ["val", "testA"], "evaluate.splits = 'testA' is not built"),
    ("render.n_images", 0, "render.n_images = 0"),
    ("synthetic.min_objects", 9, "synthetic.min_objects = 9"),
    ("synthetic.novel_combos", ["red"], "synthetic.novel_combos = 'red'"),
    ("model.tiny.image_size", 100, "model.tiny.image_size = 100 must be divisible by model.tiny.patch_size"),
    ("model.tiny.fusion_heads", 3, "model.tiny.fusion_inner_dim = 128 must be divisible by model.tiny.fusion_heads"),
    ("model.tiny.shared_dim", 48, "model.tiny.shared_dim = 48 must equal model.tiny.vision_hidden"),
    ("model.real.text_max_len", 0, "model.real.text_max_len = 0 must be > 0"),
    ("model.image_std", [0.2, 0.2], "model.image_std = [0.2, 0.2] must hold 3 numbers"),
    ("tracking.experiment", " ", "tracking.experiment"),
    ("pretrain.micro_batch_size", -1, "pretrain.micro_batch_size = -1 must be >= 0"),
    ("pretrain.micro_batch_size", 24, "pretrain.micro_batch_size = 24 must divide pretrain.batch_size (64)"),
    ("pretrain.micro_batch_size", 2.0, "pretrain.micro_batch_size = 2.0 must be an integer"),
    ("launcher.command", "", "launcher.command = '' must name the program"),
    ("launcher.command", "python -m", "launcher.command = 'python -m' must not contain -m"),
    ("launcher.command", 2, "launcher.command = 2 must be a string"),
])
def test_bad_values_named(params_dict, key, value, fragment):
    *path, leaf = key.split(".")
    node = params_dict
    for part in path:
        node = node[part]
    node[leaf] = value
    assert fragment in _error(params_dict)


def test_head_rule_needs_a_trained_head(params_dict):
    params_dict["evaluate"]["no_target_rule"] = "head"
    params_dict["finetune"]["no_target_weight"] = 0.0
    assert "evaluate.no_target_rule = 'head' needs a trained no-target head" in _error(params_dict)
    params_dict["evaluate"]["no_target_rule"] = "area"
    assert params_from_dict(params_dict).evaluate.no_target_rule == "area"


def test_grefcoco_paths_must_exist(params_dict, tmp_path):
    params_dict["data"]["source"] = "grefcoco"
    params_dict["data"]["grefs_path"] = str(tmp_path / "missing.json")
    message = _error(params_dict)
    assert "data.grefs_path" in message and "missing.json" in message and "does not exist" in message


def test_load_params_names_the_file(tmp_path, params_dict):
    path = tmp_path / "params.yaml"
    path.write_text("lora: [unclosed")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(path)
    params_dict["lora"]["r"] = -1
    path.write_text(yaml.safe_dump(params_dict))
    with pytest.raises(ConfigError, match=r"params.yaml: lora.r = -1 must be > 0"):
        load_params(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_launcher_and_micro_batch_defaults(params_dict):
    params = params_from_dict(params_dict)
    assert params.launcher.command == "python"  # dvc.yaml runs `${launcher.command} -m stages.<name>`
    assert params.pretrain.micro_batch_size == 0
    assert params.pretrain.per_rank_micro_batch(1) == params.pretrain.batch_size  # 0 = the whole batch
    params_dict["launcher"]["command"] = "torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=head:29400"
    assert params_from_dict(params_dict).launcher.command.startswith("torchrun")


def test_global_batches_must_split_over_the_ranks(params_dict):
    params_dict["pretrain"].update(batch_size=48, micro_batch_size=8)
    params = params_from_dict(params_dict)
    params.check_world_size(2)
    assert params.pretrain.per_rank_batch(2) == 24 and params.pretrain.per_rank_micro_batch(2) == 8
    assert params.finetune.per_rank_batch(2) == params_dict["finetune"]["batch_size"] // 2
    with pytest.raises(ConfigError, match=r"finetune.batch_size = 64 must be divisible by the number of ranks \(3\)"):
        params.check_world_size(3)
    with pytest.raises(ConfigError, match=r"pretrain.micro_batch_size = 8 must divide the per-rank batch 12"):
        params.check_world_size(4)
    with pytest.raises(ConfigError, match=r"pretrain.batch_size = 48 must be divisible by the number of ranks \(5\)"):
        params.check_world_size(5)
