"""build_manifest: refs (gRefCOCO or the generated shapes world) -> manifest + tokenizer.

Images and masks are decoded and resized once here, so no training step
re-opens a JPEG or re-decodes a polygon.
"""

from jurassiglip.config import Params
from jurassiglip.data.build_manifest import build_inputs
from jurassiglip.runtime.entry import entry
from jurassiglip.runtime.paths import stage_dir
from jurassiglip.runtime.tracking import StageTracker

NAME = "build_manifest"


def run(params: Params, tracker: StageTracker) -> None:
    built = build_inputs(params, stage_dir(NAME))
    # bad_images is a list of file names (kept in summary.json); metrics are numbers only
    counts = {k: v for k, v in built.summary.items() if k != "bad_images"}
    tracker.log_metrics({**counts, "vocab_size": built.vocab_size, "splits_missing": len(built.refs.missing_splits)})


main = entry(NAME, run)

if __name__ == "__main__":
    main()
