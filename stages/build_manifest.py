"""build_manifest: refs (gRefCOCO or the generated shapes world) -> manifest + tokenizer.

Images and masks are decoded and resized once here, so no training step
re-opens a JPEG or re-decodes a polygon.
"""

from jurassiglip.config import Params
from jurassiglip.data.manifest import build_manifest
from jurassiglip.data.refs import read_refs
from jurassiglip.data.source import resolve_source
from jurassiglip.data.tokenizer import build_word_tokenizer
from jurassiglip.runtime.entry import entry
from jurassiglip.runtime.paths import stage_dir
from jurassiglip.runtime.tracking import StageTracker

NAME = "build_manifest"


def run(params: Params, tracker: StageTracker) -> None:
    out = stage_dir(NAME)
    source = resolve_source(params, out / "source")
    refs = read_refs(source.grefs_path, source.instances_path, splits=params.data.splits,
                     max_refs_per_split=params.data.max_refs_per_split,
                     drop_no_target=params.data.drop_no_target,
                     required_splits=(params.data.train_split, params.data.val_split))
    summary = build_manifest(refs, source.images_dir, out / "manifest", image_size=params.model.arch.image_size,
                             on_bad_image=params.data.on_bad_image, workers=params.data.workers)
    train_captions = [s.sentence for s in refs.samples if s.split == params.data.train_split]
    vocab = build_word_tokenizer(train_captions, out / "tokenizer")
    # bad_images is a list of file names (kept in summary.json); metrics are numbers only
    counts = {k: v for k, v in summary.items() if k != "bad_images"}
    tracker.log_metrics({**counts, "vocab_size": vocab, "splits_missing": len(refs.missing_splits)})


main = entry(NAME, run)

if __name__ == "__main__":
    main()
