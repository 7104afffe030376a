"""Typed configuration: the one reader of params.yaml.

Every dataclass below mirrors one section of params.yaml, field for field, so
`lora.r` in YAML is `params.lora.r` in code, in MLflow and on the
`dvc exp run -S lora.r=16` line. Defaults live in params.yaml only: no field
here has one, so a missing key fails at load time. Unknown keys, wrong types
and values out of range fail too, before any work, with the dotted key and
the offending value in the message.

A knob whose right value depends on a choice made elsewhere (the learning
rate on `model.preset`, the splits on `data.source`) is written in
params.yaml as a mapping keyed by every option of that choice, e.g.
`lr: {tiny: 3.0e-3, real: 1.0e-4}`; `resolve_choices` picks the active value
before anything else reads the tree, so code, MLflow and `dvc exp show` see
one number. A plain value (`-S pretrain.lr=1e-3`) applies to every option.

Why one long module: it is the only reader of params.yaml, one dataclass per section with its
checks; keeping them together keeps the mirror of params.yaml in one place.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = "params.yaml"

# The choices other knobs may depend on: dotted key -> its options.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.preset": ("tiny", "real"),
    "data.source": ("synthetic", "grefcoco"),
}


class ConfigError(ValueError):
    """A params.yaml problem, always naming the dotted key and the value."""


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "grefcoco"]
    grefs_path: str
    instances_path: str
    images_dir: str
    splits: list[str]
    train_split: str
    val_split: str
    max_refs_per_split: int
    drop_no_target: bool
    on_bad_image: Literal["fail", "skip"]
    workers: int

    def validate(self, key: str) -> None:
        _require(self.workers >= 0, f"{key}.workers", self.workers, "must be >= 0 (0 = one per core)")
        _require(len(self.splits) > 0, f"{key}.splits", self.splits, "must name at least one split")
        _require(len(set(self.splits)) == len(self.splits), f"{key}.splits", self.splits, "has duplicates")
        for name in ("train_split", "val_split"):
            value = getattr(self, name)
            _require(value in self.splits, f"{key}.{name}", value, f"must be one of {key}.splits {self.splits}")
        _require(self.val_split != self.train_split, f"{key}.val_split", self.val_split,
                 f"must differ from {key}.train_split: early stopping and the headline metrics need held-out data")
        _require(self.max_refs_per_split >= 0, f"{key}.max_refs_per_split", self.max_refs_per_split, "must be >= 0")


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int
    n_images: dict[str, int]
    min_objects: int
    max_objects: int
    min_side: int
    max_side: int
    refs_per_image: int
    no_target_share: float
    novel_combos: list[str]
    rle_share: float

    def validate(self, key: str) -> None:
        from jurassiglip.data.synthetic import COLOURS, SHAPES  # the generator's vocabulary

        _require(self.seed >= 0, f"{key}.seed", self.seed, "must be >= 0")
        for split, n in self.n_images.items():
            _require(n > 0, f"{key}.n_images.{split}", n, "must be > 0")
        _require(1 <= self.min_objects <= self.max_objects, f"{key}.min_objects", self.min_objects,
                 f"must be between 1 and max_objects ({self.max_objects})")
        _require(self.max_objects <= 8, f"{key}.max_objects", self.max_objects, "must be <= 8")
        _require(32 <= self.min_side <= self.max_side, f"{key}.min_side", self.min_side,
                 f"must be between 32 and max_side ({self.max_side})")
        _require(self.refs_per_image > 0, f"{key}.refs_per_image", self.refs_per_image, "must be > 0")
        _require(0.0 <= self.no_target_share < 1.0, f"{key}.no_target_share", self.no_target_share, "must be in [0, 1)")
        _require(0.0 <= self.rle_share <= 1.0, f"{key}.rle_share", self.rle_share, "must be in [0, 1]")
        for combo in self.novel_combos:
            words = combo.split()
            _require(len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES, f"{key}.novel_combos", combo,
                     f"must be '<colour> <shape>' with colour in {list(COLOURS)} and shape in {list(SHAPES)}")
        _require(len(set(self.novel_combos)) < len(COLOURS) * len(SHAPES), f"{key}.novel_combos", self.novel_combos,
                 "must leave some colour-shape pairs for the training split")


@dataclass(frozen=True)
class TinyPreset:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    register_tokens: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_mlp: int
    text_max_len: int
    text_tower_mask: bool
    shared_dim: int
    fusion_inner_dim: int
    fusion_heads: int
    head_hidden: int

    def validate(self, key: str) -> None:
        _require_positive(self, key, "image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads",
                          "vision_mlp", "text_hidden", "text_layers", "text_heads", "text_mlp", "text_max_len",
                          "shared_dim", "fusion_inner_dim", "fusion_heads", "head_hidden")
        _require(self.register_tokens >= 0, f"{key}.register_tokens", self.register_tokens, "must be >= 0")
        _require(self.image_size % self.patch_size == 0, f"{key}.image_size", self.image_size,
                 f"must be divisible by {key}.patch_size ({self.patch_size})")
        _require(self.vision_hidden % self.vision_heads == 0, f"{key}.vision_hidden", self.vision_hidden,
                 f"must be divisible by {key}.vision_heads ({self.vision_heads})")
        _require(self.text_hidden % self.text_heads == 0, f"{key}.text_hidden", self.text_hidden,
                 f"must be divisible by {key}.text_heads ({self.text_heads})")
        _require(self.shared_dim == self.vision_hidden, f"{key}.shared_dim", self.shared_dim,
                 f"must equal {key}.vision_hidden ({self.vision_hidden}): patch tokens are the fusion queries")
        _check_fusion(self, key)


@dataclass(frozen=True)
class RealPreset:
    image_size: int
    vision_name: str
    text_name: str
    text_max_len: int
    text_tower_mask: bool
    shared_dim: int
    fusion_inner_dim: int
    fusion_heads: int
    head_hidden: int

    def validate(self, key: str) -> None:
        # Divisibility by the patch size and the text length limit are checked against the
        # loaded checkpoints' own configs (model/build.py), which this file cannot see.
        _require_positive(self, key, "image_size", "text_max_len", "shared_dim", "fusion_inner_dim", "fusion_heads",
                          "head_hidden")
        _check_fusion(self, key)


@dataclass(frozen=True)
class DecoderConfig:
    kind: Literal["prototype", "refine"]
    blocks: int
    guide_channels: int
    guide_to_grid: bool

    def validate(self, key: str) -> None:
        _require(self.blocks >= 0, f"{key}.blocks", self.blocks, "must be >= 0")
        _require(self.guide_channels >= 0, f"{key}.guide_channels", self.guide_channels, "must be >= 0 (0 = no guide)")


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["tiny", "real"]
    image_mean: list[float]
    image_std: list[float]
    decoder: DecoderConfig
    tiny: TinyPreset
    real: RealPreset

    @property
    def arch(self) -> TinyPreset | RealPreset:
        """The active preset: the block named by `model.preset`."""
        return self.tiny if self.preset == "tiny" else self.real

    def validate(self, key: str) -> None:
        if self.decoder.kind == "refine":
            _require(self.arch.shared_dim % 4 == 0, f"{key}.{self.preset}.shared_dim", self.arch.shared_dim,
                     f"must be divisible by 4 for {key}.decoder.kind refine (its 2-D position code)")
            if self.decoder.guide_channels:
                _require(self.arch.image_size % 4 == 0, f"{key}.{self.preset}.image_size", self.arch.image_size,
                         f"must be divisible by 4 for {key}.decoder.guide_channels > 0 (4-pixel cells)")
        for name in ("image_mean", "image_std"):
            _require(len(getattr(self, name)) == 3, f"{key}.{name}", getattr(self, name), "must hold 3 numbers (RGB)")
        _require(all(s > 0 for s in self.image_std), f"{key}.image_std", self.image_std, "must be > 0")
        _require(all(0.0 <= m <= 1.0 for m in self.image_mean), f"{key}.image_mean", self.image_mean,
                 "must be in [0, 1] (pixels are scaled to [0, 1] before normalising)")


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    dropout: float
    targets: list[str]

    def validate(self, key: str) -> None:
        _require(self.r > 0, f"{key}.r", self.r, "must be > 0")
        _require(self.alpha > 0, f"{key}.alpha", self.alpha, "must be > 0")
        _require(0.0 <= self.dropout < 1.0, f"{key}.dropout", self.dropout, "must be in [0, 1)")
        _require(len(self.targets) > 0, f"{key}.targets", self.targets, "must name at least one module")


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    loss: Literal["clip", "sigmoid"]
    lr_schedule: Literal["constant", "cosine"]
    logit_scale_init: float
    logit_scale_max: float
    max_val_batches: int
    log_every: int
    num_workers: int
    micro_batch_size: int

    def validate(self, key: str) -> None:
        _check_training(self, key)
        _require(self.batch_size >= 2, f"{key}.batch_size", self.batch_size, "must be >= 2 (contrastive negatives)")
        _require(0.0 <= self.logit_scale_init <= self.logit_scale_max, f"{key}.logit_scale_init",
                 self.logit_scale_init, f"must be in [0, {key}.logit_scale_max ({self.logit_scale_max})]")
        _require(self.micro_batch_size >= 0, f"{key}.micro_batch_size", self.micro_batch_size,
                 "must be >= 0 (0 = the whole batch at once)")
        if self.micro_batch_size:
            _require(self.batch_size % self.micro_batch_size == 0, f"{key}.micro_batch_size", self.micro_batch_size,
                     f"must divide {key}.batch_size ({self.batch_size})")

    def per_rank_batch(self, world_size: int) -> int:
        """Samples per step on each of `world_size` ranks (batch_size is the global batch)."""
        return _per_rank_batch("pretrain", self.batch_size, world_size)

    def per_rank_micro_batch(self, world_size: int) -> int:
        """Samples per forward pass on each rank: micro_batch_size, or the whole per-rank batch when 0."""
        batch = self.per_rank_batch(world_size)
        micro = self.micro_batch_size or batch
        _require(batch % micro == 0, "pretrain.micro_batch_size", self.micro_batch_size,
                 f"must divide the per-rank batch {batch} (pretrain.batch_size {self.batch_size} / "
                 f"{world_size} ranks)")
        return micro


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    dice_weight: float
    focal_weight: float
    focal_alpha: float
    focal_gamma: float
    no_target_weight: float
    lr_schedule: Literal["constant", "cosine"]
    cache_features: bool
    max_val_batches: int
    log_every: int
    num_workers: int

    def validate(self, key: str) -> None:
        _check_training(self, key)
        for name in ("dice_weight", "focal_weight"):
            _require(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "must be >= 0")
        _require(self.dice_weight + self.focal_weight > 0, f"{key}.dice_weight", self.dice_weight,
                 "and focal_weight cannot both be 0")
        _require(0.0 <= self.focal_alpha <= 1.0, f"{key}.focal_alpha", self.focal_alpha, "must be in [0, 1]")
        _require(self.focal_gamma >= 0, f"{key}.focal_gamma", self.focal_gamma, "must be >= 0")
        _require(self.no_target_weight >= 0, f"{key}.no_target_weight", self.no_target_weight, "must be >= 0")

    def per_rank_batch(self, world_size: int) -> int:
        """Captions per step on each of `world_size` ranks (batch_size is the global batch)."""
        return _per_rank_batch("finetune", self.batch_size, world_size)


@dataclass(frozen=True)
class EvaluateConfig:
    splits: list[str]
    resolution: str | int
    mask_threshold: float
    no_target_rule: Literal["area", "head"]
    no_target_min_area: float
    no_target_threshold: float
    batch_size: int

    def validate(self, key: str) -> None:
        _require(len(self.splits) > 0, f"{key}.splits", self.splits, "must name at least one split")
        _require(len(set(self.splits)) == len(self.splits), f"{key}.splits", self.splits, "has duplicates")
        if isinstance(self.resolution, str):
            _require(self.resolution == "original", f"{key}.resolution", self.resolution,
                     "must be 'original' or a positive integer")
        else:
            _require(self.resolution > 0, f"{key}.resolution", self.resolution, "must be > 0")
        _require(0.0 < self.mask_threshold < 1.0, f"{key}.mask_threshold", self.mask_threshold, "must be in (0, 1)")
        _require(0.0 <= self.no_target_min_area < 1.0, f"{key}.no_target_min_area", self.no_target_min_area,
                 "must be in [0, 1)")
        _require(0.0 < self.no_target_threshold < 1.0, f"{key}.no_target_threshold", self.no_target_threshold,
                 "must be in (0, 1)")
        _require(self.batch_size > 0, f"{key}.batch_size", self.batch_size, "must be > 0")


@dataclass(frozen=True)
class RenderConfig:
    split: str
    n_images: int
    max_captions: int

    def validate(self, key: str) -> None:
        _require(self.n_images > 0, f"{key}.n_images", self.n_images, "must be > 0")
        _require(self.max_captions > 0, f"{key}.max_captions", self.max_captions, "must be > 0")


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str

    def validate(self, key: str) -> None:
        _require(bool(self.experiment.strip()), f"{key}.experiment", self.experiment, "must not be empty")


@dataclass(frozen=True)
class LauncherConfig:
    command: str
    timeout_s: int

    def validate(self, key: str) -> None:
        _require(bool(self.command.strip()), f"{key}.command", self.command,
                 "must name the program that runs a training stage module (python, or torchrun with its flags)")
        _require(" -m " not in f" {self.command} ", f"{key}.command", self.command,
                 "must not contain -m: dvc.yaml appends `-m stages.<name>` itself")
        _require(self.timeout_s > 0, f"{key}.timeout_s", self.timeout_s, "must be > 0 (seconds)")


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataConfig
    synthetic: SyntheticConfig
    model: ModelConfig
    lora: LoraConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig
    render: RenderConfig
    tracking: TrackingConfig
    launcher: LauncherConfig

    def validate(self, key: str = "") -> None:
        """Cross-section checks; each section checked its own fields already."""
        _require(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2**63)")
        for split in self.evaluate.splits:
            _require(split in self.data.splits, "evaluate.splits", split, f"is not built (data.splits {self.data.splits})")
        if self.evaluate.no_target_rule == "head":
            _require(self.finetune.no_target_weight > 0, "evaluate.no_target_rule", "head",
                     "needs a trained no-target head: finetune.no_target_weight is 0")
        _require(self.render.split in self.data.splits, "render.split", self.render.split,
                 f"is not built (data.splits {self.data.splits})")
        _require(self.render.split in self.evaluate.splits, "render.split", self.render.split,
                 f"is not evaluated (evaluate.splits {self.evaluate.splits}): the gallery shows evaluated captions")
        if self.data.source == "synthetic":
            for split in self.data.splits:
                _require(split in self.synthetic.n_images, "data.splits", split,
                         f"has no size in synthetic.n_images {sorted(self.synthetic.n_images)}")

    def check_paths(self, root: Path) -> None:
        """The input files params name exist; relative paths are relative to `root`, the repository
        (where params.yaml lives and DVC runs the stages)."""
        if self.data.source == "grefcoco":
            for name in ("grefs_path", "instances_path", "images_dir"):
                path = Path(getattr(self.data, name))
                _require((root / path).exists(), f"data.{name}", str(path),
                         "does not exist (data.source is grefcoco)")

    def check_world_size(self, world_size: int) -> None:
        """The global batches must split evenly over the ranks torchrun started (1 without torchrun)."""
        self.pretrain.per_rank_micro_batch(world_size)
        self.finetune.per_rank_batch(world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read, type-check and validate params.yaml. Raises ConfigError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return params_from_dict(raw, root=path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def params_from_dict(raw: Any, root: Path = Path(".")) -> Params:
    """Build and validate Params from a plain dict (as parsed from YAML); relative input paths from `root`."""
    params = _build(Params, resolve_choices(raw), "")
    params.validate()
    params.check_paths(root)
    return params


def resolve_choices(tree: Any) -> Any:
    """Replace every per-choice mapping in a raw params tree by the active option's value.

    A mapping whose keys are exactly the options of one of `CHOICES` (e.g.
    `{tiny: 3.0e-3, real: 1.0e-4}`) becomes the value for the option params
    selects (`model.preset`). Everything else is returned unchanged (copied).

    Raises:
        ConfigError: a choice's own value is not one of its options.
    """
    if not isinstance(tree, dict):
        return tree
    active: dict[frozenset[str], str] = {}
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = tree.get(section, {}).get(name) if isinstance(tree.get(section), dict) else None
        if value is None:
            continue  # missing: _build names the key
        if value not in options:
            raise ConfigError(f"{key} = {value!r} must be one of {list(options)}")
        active[frozenset(options)] = value

    def pick(node: Any) -> Any:
        if isinstance(node, dict):
            option = active.get(frozenset(node))
            if option is not None:
                return pick(node[option])
            return {k: pick(v) for k, v in node.items()}
        if isinstance(node, list):
            return [pick(v) for v in node]
        return node

    return pick(tree)


def flatten(tree: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}; lists stay values."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten(value, sep, key + sep))
        else:
            flat[key] = value
    return flat


# -- internals ---------------------------------------------------------------

def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} {why}")


def _require_positive(section: Any, key: str, *names: str) -> None:
    for name in names:
        _require(getattr(section, name) > 0, f"{key}.{name}", getattr(section, name), "must be > 0")


def _check_fusion(arch: TinyPreset | RealPreset, key: str) -> None:
    _require(arch.fusion_inner_dim % arch.fusion_heads == 0, f"{key}.fusion_inner_dim", arch.fusion_inner_dim,
             f"must be divisible by {key}.fusion_heads ({arch.fusion_heads})")


def _check_training(section: Any, key: str) -> None:
    _require_positive(section, key, "epochs", "batch_size", "log_every")
    _require(section.lr > 0, f"{key}.lr", section.lr, "must be > 0")
    _require(section.weight_decay >= 0, f"{key}.weight_decay", section.weight_decay, "must be >= 0")
    _require(section.patience > 0, f"{key}.patience", section.patience, "must be > 0")
    _require(section.max_val_batches >= 0, f"{key}.max_val_batches", section.max_val_batches, "must be >= 0")
    _require(section.num_workers >= 0, f"{key}.num_workers", section.num_workers, "must be >= 0")


def _per_rank_batch(section: str, batch_size: int, world_size: int) -> int:
    _require(batch_size % world_size == 0, f"{section}.batch_size", batch_size,
             f"must be divisible by the number of ranks ({world_size}): it is the global batch, "
             f"each rank takes batch_size / {world_size}")
    return batch_size // world_size


def _build(cls: type, raw: Any, key: str) -> Any:
    where = key or "params"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} = {raw!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{_join(key, unknown[0])}: unknown key (known: {', '.join(names)})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"{_join(key, missing[0])}: missing key")
    values = {n: _coerce(hints[n], raw[n], _join(key, n)) for n in names}
    obj = cls(**values)
    if hasattr(obj, "validate") and cls is not Params:
        obj.validate(key)
    return obj


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key} = {value!r} must be one of {list(typing.get_args(hint))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r} has the wrong type (expected {hint})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r} must be a list")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} must be a mapping")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} must be a string")
        return value
    raise TypeError(f"config.py: unsupported type {hint} for {key}")
