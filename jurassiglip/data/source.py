"""Where the refs come from: the generated shapes world or gRefCOCO files on disk.

Both give the same three paths (refs JSON, COCO instances JSON, images
folder), so everything downstream reads them with the one real reader.

The source folder (build_manifest's `source/` output) exists for either:
the generated files for the synthetic set; for gRefCOCO, `source.json`,
which records the files read (path, size, SHA-256) so that a run says which
annotations it was built from. The images folder is recorded by path only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from jurassiglip.runtime import atomic
from jurassiglip.config import Params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFiles:
    grefs_path: Path
    instances_path: Path
    images_dir: Path


SOURCE_RECORD = "source.json"


def resolve_source(params: Params, source_dir: Path) -> SourceFiles:
    """gRefCOCO paths from params (recorded in `source_dir`), or the synthetic set generated into `source_dir`."""
    data = params.data
    if data.source == "grefcoco":
        files = SourceFiles(Path(data.grefs_path), Path(data.instances_path), Path(data.images_dir))
        record_source(files, source_dir)
        return files
    from jurassiglip.data.synthetic import generate

    syn = params.synthetic
    log.info("generating the synthetic shapes world (seed %d) into %s", syn.seed, source_dir)
    files = generate(
        source_dir,
        seed=syn.seed,
        n_images={split: syn.n_images[split] for split in data.splits},
        min_objects=syn.min_objects,
        max_objects=syn.max_objects,
        min_side=syn.min_side,
        max_side=syn.max_side,
        refs_per_image=syn.refs_per_image,
        no_target_share=syn.no_target_share,
        novel_combos=list(syn.novel_combos),
        rle_share=syn.rle_share,
    )
    return SourceFiles(Path(files.grefs_path), Path(files.instances_path), Path(files.images_dir))


def record_source(files: SourceFiles, source_dir: Path) -> None:
    """Write `source_dir/source.json`: which gRefCOCO files were read, with their size and SHA-256."""
    record = {"source": "grefcoco", "images_dir": str(files.images_dir), "files": {}}
    for path in (files.grefs_path, files.instances_path):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        record["files"][str(path)] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    with atomic.atomic_dir(source_dir) as tmp:
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log.info("reading gRefCOCO files %s and %s (recorded in %s)", files.grefs_path, files.instances_path,
             source_dir / SOURCE_RECORD)
