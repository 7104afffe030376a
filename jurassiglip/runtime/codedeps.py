"""The code each stage runs, derived from its imports: dvc.yaml's code deps and the resume fingerprint.

A stage's code is `stages/<stage>.py` plus every module of this package in
the transitive closure of its imports, found statically with `ast`: every
`import` and `from ... import` anywhere in a file (inside functions too),
relative imports resolved, a package's `__init__.py` counted whenever the
package or anything in it is imported, and `from pkg import name` counting
`pkg/name.py` when `name` is a submodule.

Two consumers use the same list, so they cannot drift apart:
- dvc.yaml lists it file by file as each stage's code deps (tests/runtime/test_codedeps.py
  checks that), so `dvc repro` re-runs exactly the stages a code change affects;
- `fingerprint` hashes it, so a resume never continues a run started by other code
  while an edit elsewhere (rendering, say) leaves a training run resumable.

`python -m jurassiglip.runtime.codedeps` prints every stage's list as dvc.yaml lines.
Nothing here names a folder inside the package: modules can move between
subpackages and only dvc.yaml needs regenerating (plus EXCLUDED's names, which
the tests check still name modules).
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jurassiglip

PACKAGE = "jurassiglip"
# The checkout whose code is running: the folder holding jurassiglip/ and stages/.
ROOT = Path(jurassiglip.__file__).resolve().parent.parent

# Plumbing: modules that decide how a stage runs, logs or writes, never what its outputs hold.
# They are not code deps, and the closure does not follow their imports (what they import is
# reached through a real dependency or is plumbing too). The one list of exclusions.
EXCLUDED = (
    "jurassiglip",                   # __init__.py: telemetry switches in the environment
    "jurassiglip.runtime",           # the runtime package's __init__.py: its docstring only
    "jurassiglip.runtime.entry",     # the entry point: logging, signals, params file, the process group
    "jurassiglip.runtime.tracking",  # how runs are logged to MLflow and DVC's metrics/plots files
    "jurassiglip.runtime.atomic",    # how a file reaches disk (temp file, fsync, rename); the caller makes the bytes
    "jurassiglip.cli",               # the predict command line; no stage imports it
    "jurassiglip.runtime.codedeps",  # this module: which code a stage depends on is not part of what it computes
)


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of module `name` under `root` (`a/b.py` or the package's `a/b/__init__.py`), if any."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_parents(name: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: importing a module imports every package above it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Names of the modules of this package that the file at `path` imports, anywhere in the file.

    Includes each imported module's parent packages, and `pkg.name` for `from pkg import name`
    when that is a module (a submodule, not an attribute).
    """
    this = _module_name(path, root)
    # The package a relative import starts from: the module's own package (itself for an __init__.py).
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names = [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE:
                found.update(n for n in _with_parents(name) if module_file(n, root) is not None)
    return found


def stage_code_deps(stage: str, root: Path = ROOT) -> list[str]:
    """Repository-relative POSIX paths, sorted, of the code stage `stage` runs: its module plus the
    closure of this package's modules it imports, minus EXCLUDED (whose imports are not followed).

    Raises:
        FileNotFoundError: there is no `stages/<stage>.py` under `root`.
    """
    entry = root / "stages" / f"{stage}.py"
    if not entry.is_file():
        raise FileNotFoundError(f"no stage module {entry}")
    files = {entry}
    todo = [entry]
    seen: set[str] = set()
    while todo:
        for name in imported_modules(todo.pop(), root):
            if name in seen or name in EXCLUDED:
                continue
            seen.add(name)
            path = module_file(name, root)
            files.add(path)
            todo.append(path)
    return sorted(path.relative_to(root).as_posix() for path in files)


def fingerprint(stage: str, *parts: Any, files: Iterable[Path] = (), root: Path = ROOT) -> str:
    """Hash of what defines a training run: `parts` (params, as JSON), the stage's code
    (`stage_code_deps`, the same files DVC watches) and the upstream `files`.

    The code is included so that a resume never continues a run started by other code
    (DVC re-runs a stage after a change to its code; the old latest checkpoint must not
    be picked up then), and only the stage's code, so that an unrelated edit does not.
    """
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    code = [(name, root / name) for name in stage_code_deps(stage, root)]
    for label, path in [*code, *((Path(f).name, Path(f)) for f in files)]:
        digest.update(label.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def dvc_yaml_lines(stage: str, root: Path = ROOT, indent: int = 6) -> list[str]:
    """The code deps of `stage` as dvc.yaml lines (a comment saying where they come from, then the list)."""
    pad = " " * indent
    return [f"{pad}# code: python -m jurassiglip.runtime.codedeps {stage}",
            *(f"{pad}- {path}" for path in stage_code_deps(stage, root))]


def rewrite_dvc_yaml(text: str, root: Path = ROOT) -> str:
    """dvc.yaml's text with each stage's code deps replaced by `stage_code_deps`; everything else kept.

    Code deps are the `deps:` entries under stages/ or jurassiglip/; the derived list goes after the
    stage's other deps (upstream outs), as `dvc_yaml_lines` writes it.
    """
    lines, out, stage, in_deps = text.splitlines(), [], None, False
    for line in [*lines, ""]:
        if in_deps:
            item = line.strip()
            if line.startswith("      ") and item.startswith(("- ", "#")):
                if not item.startswith(("- stages/", f"- {PACKAGE}/", "# code:")):
                    out.append(line)
                continue
            out.extend(dvc_yaml_lines(stage, root))
            in_deps = False
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        in_deps = line == "    deps:" and stage is not None
        out.append(line)
    return "\n".join(out[:-1]) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Print each stage's code deps (all stages, or those named) as dvc.yaml lines;
    with --write, rewrite them in the checkout's dvc.yaml instead."""
    from jurassiglip.runtime.paths import STAGES

    args = list(sys.argv[1:] if argv is None else argv)
    if "--write" in args:
        path = ROOT / "dvc.yaml"
        path.write_text(rewrite_dvc_yaml(path.read_text()))
        print(f"rewrote the code deps of every stage in {path}")
        return
    for stage in args or STAGES:
        print("\n".join([f"  {stage}:", "    deps:", *dvc_yaml_lines(stage)]))


if __name__ == "__main__":
    main()
