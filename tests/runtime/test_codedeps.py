"""dvc.yaml agrees with the code: each stage's code deps are its imports, its outs are the paths the code uses.

The import closure is checked on a hand-made package (function-level, relative
and package imports; an excluded module's imports not followed), and the
resume fingerprint on a copy of this package: it moves with the stage's code
and ignores the rest.
"""

from __future__ import annotations

import ast
import importlib
import shutil
from pathlib import Path, PurePosixPath

import pytest
import yaml

from jurassiglip.runtime import paths as stage_module
from jurassiglip.runtime.codedeps import EXCLUDED, ROOT, fingerprint, module_file, rewrite_dvc_yaml, stage_code_deps
from jurassiglip.runtime.paths import DATA_DIR, STAGES

REPO = Path(__file__).resolve().parents[2]
CODE = ("stages/", "jurassiglip/")


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def declared(entries: list) -> list[PurePosixPath]:
    """The paths of a dvc.yaml list (an entry is a path or {path: options})."""
    return [PurePosixPath(e if isinstance(e, str) else next(iter(e))) for e in entries or []]


def stage_outs(spec: dict) -> list[PurePosixPath]:
    return [*declared(spec.get("outs")), *declared(spec.get("metrics")), *declared(spec.get("plots"))]


def within(path: PurePosixPath, folders: list[PurePosixPath]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def test_the_package_is_this_checkout():
    assert ROOT == REPO


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_exactly_the_modules_the_stage_imports(stage):
    listed = {str(p) for p in declared(dvc_stages()[stage]["deps"]) if str(p).startswith(CODE)}
    derived = set(stage_code_deps(stage))
    missing, extra = sorted(derived - listed), sorted(listed - derived)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage}: code deps differ from its imports; missing {missing}, extra {extra} "
        f"(`python -m jurassiglip.runtime.codedeps {stage}` prints the list)")


def test_every_exclusion_names_a_module():
    """A module that moved leaves a stale name here, which would silently make it a dependency again."""
    assert [name for name in EXCLUDED if module_file(name) is None] == []


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.fixture
def toy(tmp_path) -> Path:
    """A hand-made checkout: stage `toy` imports in a function, relatively, through a package, and an excluded
    module whose own import is not followed."""
    write(tmp_path, {
        "stages/toy.py": "from jurassiglip import a\nimport jurassiglip.runtime.tracking\n",
        "jurassiglip/__init__.py": "",
        "jurassiglip/a.py": "def f():\n    from jurassiglip.sub import c, CONSTANT\n    return c\n",
        "jurassiglip/b.py": "import os\n",
        "jurassiglip/sub/__init__.py": "CONSTANT = 1\n",
        "jurassiglip/sub/c.py": "from . import d\nfrom ..b import os\n",
        "jurassiglip/sub/d.py": "",
        "jurassiglip/runtime/tracking.py": "import jurassiglip.only_for_tracking\n",  # excluded: not followed
        "jurassiglip/only_for_tracking.py": "",
        "jurassiglip/unrelated.py": "",
    })
    return tmp_path


TOY_CODE = ["jurassiglip/a.py", "jurassiglip/b.py", "jurassiglip/sub/__init__.py", "jurassiglip/sub/c.py",
            "jurassiglip/sub/d.py", "stages/toy.py"]


def test_closure_follows_function_level_relative_and_package_imports_but_not_excluded_modules(toy):
    assert stage_code_deps("toy", toy) == TOY_CODE


def test_rewriting_dvc_yaml_replaces_only_the_code_deps(toy):
    stale = ("stages:\n  toy:\n    cmd: python -m stages.toy\n    deps:\n      - data/up/out\n"
             "      - jurassiglip/gone.py\n      - jurassiglip/sub\n      - stages/toy.py\n"
             "    outs:\n      - data/toy/out\n")
    rewritten = rewrite_dvc_yaml(stale, toy)
    assert rewritten == stale.replace(
        "      - jurassiglip/gone.py\n      - jurassiglip/sub\n      - stages/toy.py\n",
        "      # code: python -m jurassiglip.runtime.codedeps toy\n" + "".join(f"      - {p}\n" for p in TOY_CODE))
    assert rewrite_dvc_yaml(rewritten, toy) == rewritten


def test_an_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        stage_code_deps("nope", tmp_path)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of this package and its stage modules, free to edit."""
    for folder in ("jurassiglip", "stages"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def touch(path: Path) -> None:
    path.write_text(path.read_text() + "# edited\n")


def test_fingerprint_moves_with_the_stage_code_and_its_inputs_only(checkout):
    stage = "contrastive_pretrain"
    upstream = checkout / "samples.parquet"
    upstream.write_bytes(b"rows")

    def current(*parts):
        return fingerprint(stage, *(parts or ({"lr": 1e-3}, 7)), files=[upstream], root=checkout)

    base = current()
    assert current() == base
    assert "jurassiglip/inference/render.py" not in stage_code_deps(stage, checkout)
    for unrelated in ("jurassiglip/inference/render.py", "jurassiglip/runtime/tracking.py"):  # another stage's; plumbing
        touch(checkout / unrelated)
        assert current() == base, unrelated
    assert current({"lr": 2e-3}, 7) != base
    for changed in ("jurassiglip/training/contrastive_pretrain.py", "jurassiglip/model/lora.py", "stages/contrastive_pretrain.py"):
        touch(checkout / changed)
        assert current() != base, changed
        base = current()
    upstream.write_bytes(b"other rows")
    assert current() != base


# Where the stages read and write: the path constants in jurassiglip/runtime/entry.py are plain Paths that repeat
# dvc.yaml's outs, checked here rather than read from dvc.yaml (see test below).

def path_constants() -> dict[str, PurePosixPath]:
    return {name: PurePosixPath(value.as_posix()) for name, value in vars(stage_module).items()
            if isinstance(value, Path) and DATA_DIR in value.parents}


def test_dvc_yaml_has_the_stages_in_order_and_each_writes_only_its_own_folder():
    specs = dvc_stages()
    assert tuple(specs) == STAGES
    for stage, spec in specs.items():
        folder = PurePosixPath(DATA_DIR.as_posix(), stage)
        assert all(folder in out.parents for out in stage_outs(spec)), (stage, stage_outs(spec))


def test_every_path_constant_is_a_stage_folder_or_inside_a_declared_out():
    specs = dvc_stages()
    for name, path in path_constants().items():
        stage = path.parts[1]
        assert stage in specs, f"{name} = {path}: no stage {stage} in dvc.yaml"
        assert path == PurePosixPath(DATA_DIR.as_posix(), stage) or within(path, stage_outs(specs[stage])), (
            f"{name} = {path} is not declared in dvc.yaml's outs of {stage}")


def used_paths(stage: str) -> set[PurePosixPath]:
    """Every path stages/<stage>.py builds from the constants (`CONST`, `CONST / "file"`, `CONST / mod.NAME`),
    evaluated in the module; an operand the module cannot evaluate (a local) ends the path there."""
    module = importlib.import_module(f"stages.{stage}")
    constants = set(path_constants())
    tree = ast.parse((REPO / "stages" / f"{stage}.py").read_text())
    inner = {id(node.left) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in inner:
            continue
        operands = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands.insert(0, node.right)
            node = node.left
        if not (isinstance(node, ast.Name) and node.id in constants):
            continue
        path = getattr(module, node.id)
        for operand in operands:
            try:
                path = path / eval(compile(ast.Expression(operand), "<path>", "eval"), vars(module))
            except NameError:
                break
        found.add(PurePosixPath(path.as_posix()))
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_every_path_a_stage_uses_is_its_declared_out_or_dep(stage):
    """Writes go to the stage's outs, reads of other stages' outputs come through its deps."""
    spec = dvc_stages()[stage]
    allowed = [*stage_outs(spec), *(p for p in declared(spec["deps"]) if p.parts[0] == DATA_DIR.as_posix())]
    stray = sorted(str(p) for p in used_paths(stage) if not within(p, allowed))
    assert not stray, f"stages/{stage}.py uses {stray}, neither an out nor a dep of {stage} in dvc.yaml"
