"""Where the refs come from: the generated shapes world or gRefCOCO files on disk.

Both give the same three paths (refs JSON, COCO instances JSON, images
folder), so everything downstream reads them with the one real reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jurassiglip.config import Params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFiles:
    grefs_path: Path
    instances_path: Path
    images_dir: Path


def resolve_source(params: Params, synthetic_dir: Path) -> SourceFiles:
    """gRefCOCO paths from params, or generate the synthetic set into `synthetic_dir` first."""
    data = params.data
    if data.source == "grefcoco":
        return SourceFiles(Path(data.grefs_path), Path(data.instances_path), Path(data.images_dir))
    from jurassiglip.data.synthetic import generate

    syn = params.synthetic
    log.info("generating the synthetic shapes world (seed %d) into %s", syn.seed, synthetic_dir)
    files = generate(
        synthetic_dir,
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
