"""R4: evaluation throughput, and how its cost grows from 100 to 10,000 samples.

Times what the evaluate stage does for one split: jurassiglip.inference.evaluate's
evaluate_split (model, shuffled-text baseline and text-blind union, scored at
params.evaluate.resolution) followed by split_metrics, on the first n
manifest samples relabelled as one split, with a tiny model (LoRA merged,
as the evaluate stage loads its checkpoint; random weights cost the same
as trained ones). Sizes are interleaved per round. The cost
should be linear in n: the fitted exponent b of time = a * n^b is printed
(goal b <= 1.1).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.harness import Options, interleaved, section, table, verdict
from benchmarks.setups import tiny
from jurassiglip.data.manifest import Manifest
from jurassiglip.inference.evaluate import evaluate_split, split_metrics
from jurassiglip.model.spec import ModelSpec
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.predictor import Predictor

NAME = "R4"
GOAL = 1.1  # fitted exponent, at most
SPLIT = "benchmark"

FULL = dict(sizes=(100, 1_000, 10_000), repeats=3)
QUICK = dict(sizes=(100, 300, 1_000), repeats=1)


def run(opts: Options) -> None:
    section(f"{NAME}: evaluation (evaluate_split + split_metrics) from 100 to 10,000 samples")
    cfg = QUICK if opts.quick else FULL
    setup = tiny(opts.quick)
    evaluate = setup.params.evaluate
    predictor = _predictor(setup, opts.seed, Decision.from_config(evaluate))

    def scorer(view: Manifest):
        def go() -> None:
            split_metrics(evaluate_split(predictor, view, SPLIT, resolution=evaluate.resolution,
                                         batch_size=evaluate.batch_size, seed=setup.params.seed))
        return go

    views = {n: _first_samples(setup.manifest, n) for n in cfg["sizes"]}
    scorer(views[min(views)])()  # warm-up
    times = interleaved({n: scorer(view) for n, view in views.items()}, repeats=cfg["repeats"], warmup=0)

    sizes = np.array(cfg["sizes"], dtype=float)
    medians = np.array([times[n].median for n in cfg["sizes"]])
    exponent = float(np.polyfit(np.log(sizes), np.log(medians), 1)[0])
    rows = []
    for n, view in views.items():
        t = times[n]
        n_images = view.samples.loc[view.samples["split"] == SPLIT, "image_index"].nunique()
        rows.append([n, n_images, f"{t.median:.2f}", f"{t.spread:.0%}", f"{t.median / n * 1e3:.2f}",
                     f"{n / t.median:.0f}"])
    print(f"tiny model, LoRA merged, random weights; {predictor.decision.describe()}")
    print(f"resolution={evaluate.resolution}, {evaluate.batch_size} captions per forward pass; "
          f"median of {cfg['repeats']} round(s), sizes interleaved, after a warm-up at n={min(views)}")
    print(table(["samples", "images", "s", "spread", "ms/sample", "samples/s"], rows))
    steps = ", ".join(f"{a}->{b}: {np.log(tb / ta) / np.log(b / a):.2f}"
                      for (a, ta), (b, tb) in zip(zip(cfg["sizes"], medians), zip(cfg["sizes"][1:], medians[1:])))
    print(f"fitted time ~ n^{exponent:.3f} over n = {', '.join(str(n) for n in cfg['sizes'])} "
          f"(between neighbours {steps}): goal <= {GOAL} (linear): {verdict(exponent, GOAL, at_most=True)}")


def _predictor(setup, seed: int, decision: Decision) -> Predictor:
    """A tiny model as the evaluate stage loads one (LoRA merged); its random weights cost the same."""
    model = setup.model(seed)
    model.merge_lora()
    return Predictor(model, setup.tokenizer, ModelSpec.from_params(setup.params, setup.tokenizer), decision, device="cpu")


def _first_samples(manifest: Manifest, n: int) -> Manifest:
    """The manifest with its first n samples (all splits, in sample_id order) relabelled as SPLIT."""
    if n > len(manifest.samples):
        raise SystemExit(f"the manifest has {len(manifest.samples)} samples, fewer than {n}")
    samples = manifest.samples.copy()
    samples["split"] = np.where(samples["sample_id"].to_numpy() < n, SPLIT, samples["split"].to_numpy())
    return dataclasses.replace(manifest, samples=samples)
