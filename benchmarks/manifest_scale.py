"""R6: build_manifest at gRefCOCO scale: build time per image and disk per image / caption, extrapolated.

A gRefCOCO-format slice from the synthetic generator with COCO-sized images
(480-640 px a side, as COCO train2014) is built at the real model's 512 px
by jurassiglip's own `read_refs` + `build_manifest` with 1 and 2 worker
processes, in the order 1, 2, 2, 1 so a neighbour that comes or goes slows
both alike, timed per step from the build's own log lines; the mean of the
two builds of each is reported. Next to each build: how many cores the
whole machine kept busy meanwhile (from /proc/stat), so a build that
shared the cores with other jobs shows itself.
Then, for full gRefCOCO (19,994 images, 278,232 captions):

- build time on 16 cores, each step scaled by what it iterates over
  (images; refs for the target masks; captions for reading the refs and
  writing the tables), assuming the decoding steps scale linearly with
  cores from the 2-worker run on 2 cores (per core: the 2-worker time per
  item x 2) and the serial ones (reading the refs, writing the tables) do
  not scale at all;
- disk: the manifest's files per image / per caption as measured, and the
  stage-2 feature cache at real dims computed from its layout
  (jurassiglip/training/features.py): fp16 patches 1024 x 384 per image, fp16 text
  tokens L x 384 and a bool mask L per caption, L = the positions stored.

Goals (issue 12): full build < 10 min on 16 cores; manifest + feature cache
< 30 GB. Nothing is asserted.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.harness import Options, load_line, section, table, verdict
from jurassiglip.config import load_params
from jurassiglip.data import manifest as manifest_module
from jurassiglip.data.build_manifest import build_manifest
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.refs import read_refs
from jurassiglip.data.synthetic import generate
from jurassiglip.data.tokenizer import build_word_tokenizer, load_tokenizer, tokenize

NAME = "R6"
COCO_SIDES = (480, 640)  # COCO train2014 images are mostly 640 x 480
FULL_IMAGES, FULL_CAPTIONS = 19_994, 278_232  # gRefCOCO (SPEC §8)
# gRefCOCO's refs file is not here; RefCOCO, which it extends, has 142,209
# expressions for 50,000 refs (2.84 sentences per ref). Masks are one row per
# ref, so the estimate uses that ratio and the bound one ref per caption.
REFCOCO_SENTENCES_PER_REF = 142_209 / 50_000
TARGET_CORES = 16
PATCHES, WIDTH = 1024, 384  # 32 x 32 patches of 16 at 512 px, ViT-S/16+ hidden size (fp16 in the cache)
CACHE_POSITIONS = 64  # text positions the cache stores today (params model.real.text_max_len)
TRIMMED_POSITIONS = 20  # conservative length if the cache kept only the longest caption's tokens
FP16 = 2
GOAL_MINUTES, GOAL_GB = 10.0, 30.0
GB = 1e9
FULL = dict(images=2000)
QUICK = dict(images=300)
ORDER = (1, 2, 2, 1)  # worker counts, interleaved


@dataclass
class Build:
    """One timed build: seconds per step (from the build's log lines) and in all."""

    workers: int
    read_refs_s: float
    steps: dict[str, float]  # images, targets, objects, tables
    total_s: float  # read_refs + build_manifest
    busy_cores: float  # CPU time of every process on the machine during the build / wall time


def _mean(builds: list[Build]) -> Build:
    n = len(builds)
    return Build(builds[0].workers, sum(b.read_refs_s for b in builds) / n,
                 {k: sum(b.steps[k] for b in builds) / n for k in builds[0].steps},
                 sum(b.total_s for b in builds) / n, sum(b.busy_cores for b in builds) / n)


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


class _StepClock(logging.Handler):
    """Records when build_manifest logs the end of each step (its one log line per step)."""

    ENDS = {"wrote %s: %d images": "images", "wrote %s: %d targets": "targets",
            "wrote %s: all-objects": "objects", "wrote %s (%d rows)": "tables"}

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        for start, step in self.ENDS.items():
            if str(record.msg).startswith(start):
                self.times[step] = time.perf_counter()


def run(opts: Options) -> None:
    section(f"{NAME}: build_manifest at gRefCOCO scale, 1 vs 2 worker processes, disk per image and caption")
    cfg = QUICK if opts.quick else FULL
    params = load_params()
    syn, size = params.synthetic, params.model.real.image_size
    root = Path(tempfile.mkdtemp(prefix="bench_r6_"))
    try:
        started = time.perf_counter()
        n_val = cfg["images"] // 10
        files = generate(root / "source", seed=opts.seed, n_images={"train": cfg["images"] - n_val, "val": n_val},
                         min_objects=syn.min_objects, max_objects=syn.max_objects, min_side=COCO_SIDES[0],
                         max_side=COCO_SIDES[1], refs_per_image=syn.refs_per_image,
                         no_target_share=syn.no_target_share, novel_combos=list(syn.novel_combos),
                         rle_share=syn.rle_share)
        print(f"generated {cfg['images']} images ({COCO_SIDES[0]}-{COCO_SIDES[1]} px JPEG) in "
              f"{time.perf_counter() - started:.0f} s; {load_line()}", flush=True)
        builds, sizes, counts = [], {}, {}
        for workers in ORDER:
            out = root / f"manifest_{workers}"
            builds.append(_timed_build(files, out, size, workers))
            print(f"built with {workers} worker(s) in {builds[-1].total_s:.1f} s, the machine's {os.cpu_count()} "
                  f"cores {builds[-1].busy_cores:.2f} busy on average (all processes); {load_line()}", flush=True)
            if not sizes:
                sizes, counts = _disk(out), _counts(out)
                tokens = _caption_tokens(out, root / "tokenizer")
            shutil.rmtree(out)  # one 512 px store at a time: ~0.8 MB per image
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _report(size, builds, sizes, counts, tokens)


def _timed_build(files, out: Path, size: int, workers: int) -> Build:
    clock = _StepClock()
    logger = logging.getLogger(manifest_module.__name__)
    level = logger.level
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    try:
        busy, total = _cpu_jiffies()
        start = time.perf_counter()
        refs = read_refs(files.grefs_path, files.instances_path, splits=["train", "val"], max_refs_per_split=0,
                         drop_no_target=False)
        read = time.perf_counter()
        build_manifest(refs, files.images_dir, out, image_size=size, on_bad_image="fail", workers=workers)
        end = time.perf_counter()
        busy_after, total_after = _cpu_jiffies()
    finally:
        logger.removeHandler(clock)
        logger.setLevel(level)
    marks = [read] + [clock.times[s] for s in ("images", "targets", "objects", "tables")]
    steps = {s: b - a for s, a, b in zip(("images", "targets", "objects", "tables"), marks, marks[1:])}
    cores = os.cpu_count() or 1
    return Build(workers, read - start, steps, end - start, (busy_after - busy) / (total_after - total) * cores)


def _disk(out: Path) -> dict[str, int]:
    parquet = sum((out / name).stat().st_size for name in ("samples.parquet", "images.parquet"))
    return {"images.npy": (out / "images.npy").stat().st_size, "masks.npy": (out / "masks.npy").stat().st_size,
            "image_masks.npy": (out / "image_masks.npy").stat().st_size, "parquet (both tables)": parquet}


def _counts(out: Path) -> dict[str, int]:
    m = Manifest.load(out)
    return {"images": len(m.images_table), "captions": len(m.samples), "refs": int(m.target_bits.shape[0])}


def _caption_tokens(out: Path, tokenizer_dir: Path) -> tuple[int, float]:
    """(longest, mean) caption in tokens with the word tokenizer, specials included."""
    captions = Manifest.load(out).samples["sentence"].tolist()
    build_word_tokenizer(captions, tokenizer_dir)
    _, mask = tokenize(load_tokenizer(tokenizer_dir), captions, 64)
    lengths = mask.sum(1).numpy()
    return int(lengths.max()), float(lengths.mean())


def _report(size: int, builds: list[Build], sizes: dict[str, int], counts: dict[str, int],
            tokens: tuple[int, float]) -> None:
    n_img, n_cap, n_ref = counts["images"], counts["captions"], counts["refs"]
    full_refs = round(FULL_CAPTIONS / REFCOCO_SENTENCES_PER_REF)
    print(f"slice: {n_img} images ({COCO_SIDES[0]}-{COCO_SIDES[1]} px), {n_ref} refs, {n_cap} captions "
          f"({n_cap / n_img:.1f} per image, {n_cap / n_ref:.2f} per ref) at {size} px; machine: "
          f"{os.cpu_count()} cores; the builds ran one after the other in this process (workers: separate "
          f"processes); anything else on the machine shows in 'busy cores' (about 1 for 1 worker and up to 2 "
          f"for 2 workers when alone)")

    per = {"images": n_img, "targets": n_ref, "objects": n_img, "tables": n_cap, "read_refs": n_cap}
    one = _mean([b for b in builds if b.workers == 1])
    two = _mean([b for b in builds if b.workers == 2])
    rows = []
    for b in (one, two):
        steps = {"read_refs": b.read_refs_s, **b.steps}
        rows.append([f"{b.workers} worker(s), mean of {ORDER.count(b.workers)}", f"{b.total_s:.1f}",
                     f"{b.busy_cores:.2f}", f"{b.total_s / n_img * 1e3:.1f}",
                     *(f"{steps[s] / per[s] * 1e3:.2f}" for s in ("read_refs", "images", "targets", "objects",
                                                                   "tables"))])
    rows.append(["speed-up 2 vs 1", f"{one.total_s / two.total_s:.2f}x", "", "",
                 *(f"{a / b:.2f}x" for a, b in zip([one.read_refs_s, *one.steps.values()],
                                                   [two.read_refs_s, *two.steps.values()]))])
    print("\nbuild time (ms per item: per caption for read_refs and tables, per ref for targets, per image else)")
    print(table(["build", "s", "busy cores", "ms/image", "read_refs /cap", "images /img", "targets /ref",
                 "objects /img", "tables /cap"], rows))

    # 16 cores: decoding steps per core = 2-worker time per item x 2 cores, over 16; the rest serial.
    def full_minutes(refs: int) -> float:
        parallel = (two.steps["images"] / n_img * FULL_IMAGES + two.steps["objects"] / n_img * FULL_IMAGES
                    + two.steps["targets"] / n_ref * refs) * 2 / TARGET_CORES
        serial = (two.read_refs_s + two.steps["tables"]) / n_cap * FULL_CAPTIONS
        return (parallel + serial) / 60

    simple = two.total_s / n_img * 2 / TARGET_CORES * FULL_IMAGES / 60
    print(f"\nfull gRefCOCO build on {TARGET_CORES} cores ({FULL_IMAGES} images, {FULL_CAPTIONS} captions), "
          f"decoding assumed to scale linearly with cores from 2 workers on 2 cores, reading refs and "
          f"writing tables serial:")
    print(table(["estimate", "minutes", "goal", "verdict"], [
        [f"per step, {full_refs} refs (RefCOCO's 2.84 captions per ref)", f"{full_minutes(full_refs):.1f}",
         f"< {GOAL_MINUTES:g}", verdict(full_minutes(full_refs), GOAL_MINUTES, at_most=True)],
        [f"per step, {FULL_CAPTIONS} refs (bound: one per caption)", f"{full_minutes(FULL_CAPTIONS):.1f}",
         f"< {GOAL_MINUTES:g}", verdict(full_minutes(FULL_CAPTIONS), GOAL_MINUTES, at_most=True)],
        ["whole build per image, all of it scaled", f"{simple:.1f}", f"< {GOAL_MINUTES:g}",
         verdict(simple, GOAL_MINUTES, at_most=True)],
    ]))

    longest, mean = tokens
    patch_bytes = PATCHES * WIDTH * FP16
    text_bytes = {L: L * WIDTH * FP16 + L for L in (CACHE_POSITIONS, TRIMMED_POSITIONS)}  # tokens + bool mask
    per_ref_masks = sizes["masks.npy"] / n_ref
    rows = [
        ["images.npy", "image", f"{sizes['images.npy'] / n_img:,.0f}",
         f"{sizes['images.npy'] / n_img * FULL_IMAGES / GB:.2f}"],
        ["masks.npy (one row per ref)", "ref", f"{per_ref_masks:,.0f}",
         f"{per_ref_masks * full_refs / GB:.2f} ({per_ref_masks * FULL_CAPTIONS / GB:.2f})"],
        ["image_masks.npy", "image", f"{sizes['image_masks.npy'] / n_img:,.0f}",
         f"{sizes['image_masks.npy'] / n_img * FULL_IMAGES / GB:.2f}"],
        ["samples + images .parquet", "caption", f"{sizes['parquet (both tables)'] / n_cap:,.0f}",
         f"{sizes['parquet (both tables)'] / n_cap * FULL_CAPTIONS / GB:.2f}"],
        ["cache patches.npy (fp16 1024x384)", "image", f"{patch_bytes:,}", f"{patch_bytes * FULL_IMAGES / GB:.2f}"],
        [f"cache text, {CACHE_POSITIONS} positions (today)", "caption", f"{text_bytes[CACHE_POSITIONS]:,}",
         f"{text_bytes[CACHE_POSITIONS] * FULL_CAPTIONS / GB:.2f}"],
        [f"cache text, {TRIMMED_POSITIONS} positions (trimmed)", "caption", f"{text_bytes[TRIMMED_POSITIONS]:,}",
         f"{text_bytes[TRIMMED_POSITIONS] * FULL_CAPTIONS / GB:.2f}"],
    ]
    print(f"\ndisk, measured on the slice (manifest) or computed from the layout (cache); "
          f"GB = 1e9 bytes; masks.npy at {full_refs} refs ({FULL_CAPTIONS} if one ref per caption)")
    print(table(["file", "per", "bytes", "full gRefCOCO GB"], rows))
    manifest_gb = (sizes["images.npy"] / n_img * FULL_IMAGES + sizes["image_masks.npy"] / n_img * FULL_IMAGES
                   + sizes["parquet (both tables)"] / n_cap * FULL_CAPTIONS) / GB
    masks_gb = {"est": per_ref_masks * full_refs / GB, "bound": per_ref_masks * FULL_CAPTIONS / GB}
    per_caption_masks_gb = masks_gb["bound"]  # the old layout: one row per caption
    totals = []
    for label, masks_now, positions in (
            ("before (mask per caption, 64 text positions)", per_caption_masks_gb, CACHE_POSITIONS),
            ("now (mask per ref, 64 text positions)", masks_gb["est"], CACHE_POSITIONS),
            (f"now + text cache trimmed to {TRIMMED_POSITIONS}", masks_gb["est"], TRIMMED_POSITIONS)):
        cache_gb = (patch_bytes * FULL_IMAGES + text_bytes[positions] * FULL_CAPTIONS) / GB
        total = manifest_gb + masks_now + cache_gb
        totals.append([label, f"{manifest_gb + masks_now:.1f}", f"{cache_gb:.1f}", f"{total:.1f}",
                       f"< {GOAL_GB:g}", verdict(total, GOAL_GB, at_most=True)])
    print("\nfull gRefCOCO, manifest + stage-2 feature cache (GB):")
    print(table(["layout", "manifest", "cache", "total", "goal", "verdict"], totals))
    print(f"captions in tokens (word tokenizer, EOS/BOS included): longest {longest}, mean {mean:.1f}; "
          f"gRefCOCO's are similar (RefCOCO: 3.5 words on average) and SigLIP2's subwords add a few, so "
          f"{TRIMMED_POSITIONS} positions is taken as a conservative trimmed length")
