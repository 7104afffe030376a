"""R1: one stage-2 training step from cached features vs with the frozen towers run live.

Both steps train the same cross-attention + head on the same captions; the
live one also runs the vision and text towers (without grad) first, which is
what stage 2 did in the prototype. Measured at the tiny preset (batch 64, the
default recipe) and at the prototype's real dims with random weights (small
batch, so it fits and finishes on a CPU). Printed next to the FLOP ratio of
the two steps (torch.utils.flop_counter, CPU attention included): the
wall-clock speed-up should reach at least 0.8 x what the arithmetic allows.
"""

from __future__ import annotations

from benchmarks.harness import Options, count_flops, interleaved, section, table, verdict
from benchmarks.setups import Stage2Step, backbone_millions, real_batch, real_dims_model, tiny, tiny_batch

NAME = "R1"
GOAL = 0.8  # wall-clock speed-up / FLOP ratio

# (preset, batch, warm-up rounds, timed rounds)
FULL = (("tiny", 64, 3, 15), ("real dims", 4, 1, 5))
QUICK = (("tiny", 64, 1, 5), ("real dims", 1, 1, 2))


def run(opts: Options) -> None:
    section(f"{NAME}: stage-2 step, cached fp16 features vs frozen towers live")
    setup = tiny(opts.quick)
    rows, ratios = [], []
    for preset, batch_size, warmup, repeats in QUICK if opts.quick else FULL:
        if preset == "tiny":
            model, batch = setup.model(opts.seed), tiny_batch(setup, batch_size)
        else:
            real = setup.params.model.real
            model = real_dims_model(setup, opts.seed)
            batch = real_batch(setup, batch_size, real.image_size, real.text_max_len, opts.seed)
            vision_m, text_m = backbone_millions(model)
            print(f"real dims, random weights: vision backbone {vision_m:.1f} M parameters, text backbone "
                  f"{text_m:.1f} M (vocabulary cut to {model.text.backbone.config.vocab_size}), "
                  f"{real.image_size} px, {real.text_max_len} tokens")
        step = Stage2Step(model, setup.params.finetune, batch)
        flops = {"cached": count_flops(step.cached), "live": count_flops(step.live)}
        times = interleaved({"cached": step.cached, "live": step.live}, repeats=repeats, warmup=warmup)
        for path in ("cached", "live"):
            t = times[path]
            rows.append([preset, batch_size, path, repeats, f"{t.median * 1e3:.1f}", f"{t.spread:.0%}",
                         f"{flops[path] / 1e9:.2f}", f"{flops[path] / 1e9 / t.median:.1f}"])
        wall = times["live"].median / times["cached"].median
        flop = flops["live"] / flops["cached"]
        ratios.append([preset, batch_size, f"{wall:.2f}x", f"{flop:.2f}x", f"{wall / flop:.2f}",
                       f">= {GOAL}", verdict(wall / flop, GOAL)])
        del step, model
    print("ms/step: median of the timed rounds, cached and live interleaved, after warm-up; spread = IQR / median")
    print(table(["preset", "batch", "path", "rounds", "ms/step", "spread", "GFLOP", "GFLOP/s"], rows))
    print()
    print(table(["preset", "batch", "wall live/cached", "FLOP live/cached", "wall/FLOP", "goal", "verdict"], ratios))
