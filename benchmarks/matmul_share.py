"""R5: what share of this CPU's fp32 matmul peak the cached stage-2 step reaches.

The peak is the best GFLOP/s of large square torch.mm at the fixed thread
count, timed interleaved with the steps (so a busy neighbour lowers both
alike). A step's share = its FLOP count (torch.utils.flop_counter, CPU
attention included) / its time / that peak; goal >= 60 %. Steps: the tiny
preset at batch 64 and the real dims (random weights) at a small batch, plus
the same steps with the segmentation loss compiled by torch.compile (a
measurement of what fusing the per-pixel loss buys, not what the pipeline
runs). The profile then splits a step's time into matmul-type ops,
per-pixel ops (any input as large as the (B, 1, S, S) logits: the loss and
the bilinear upsampling, fwd and bwd) and the rest, with the top ops.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import Options, count_flops, interleaved, section, table, verdict
from benchmarks.setups import Stage2Step, real_batch, real_dims_model, tiny, tiny_batch

NAME = "R5"
GOAL = 0.60
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}

FULL = dict(mm_sizes=(2048, 4096), tiny_batch=64, real_batch=4, warmup=2, repeats=7, compile=True,
            profile_steps=3, top=8)
QUICK = dict(mm_sizes=(2048,), tiny_batch=64, real_batch=1, warmup=1, repeats=3, compile=False,
             profile_steps=1, top=5)


def run(opts: Options) -> None:
    section(f"{NAME}: cached stage-2 step vs the fp32 matmul peak of {opts.threads} threads")
    cfg = QUICK if opts.quick else FULL
    setup = tiny(opts.quick)
    params = setup.params
    real = params.model.real
    steps = {
        f"cached step, tiny b{cfg['tiny_batch']}": Stage2Step(setup.model(opts.seed), params.finetune,
                                                              tiny_batch(setup, cfg["tiny_batch"])),
        f"cached step, real dims b{cfg['real_batch']}": Stage2Step(
            real_dims_model(setup, opts.seed), params.finetune,
            real_batch(setup, cfg["real_batch"], real.image_size, real.text_max_len, opts.seed)),
    }
    variants, flops, notes = {}, {}, {}
    for n in cfg["mm_sizes"]:
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        variants[f"torch.mm {n}x{n}"] = lambda a=a, b=b, out=out: torch.mm(a, b, out=out)
        flops[f"torch.mm {n}x{n}"] = 2 * n ** 3
    for name, step in steps.items():
        variants[name] = step.cached
        flops[name] = count_flops(step.cached)
        if cfg["compile"]:
            compiled_name = f"{name}, compiled loss"
            variants[compiled_name], notes[compiled_name] = _compiled(step)
            flops[compiled_name] = flops[name]
    times = interleaved(variants, repeats=cfg["repeats"], warmup=cfg["warmup"])

    rate = {name: flops[name] / times[name].median for name in variants}
    peak = max(rate[name] for name in variants if name.startswith("torch.mm"))
    rows = []
    for name in variants:
        is_step = not name.startswith("torch.mm")
        share = rate[name] / peak
        rows.append([name + notes.get(name, ""), f"{flops[name] / 1e9:.2f}", f"{times[name].median * 1e3:.1f}",
                     f"{times[name].spread:.0%}", f"{rate[name] / 1e9:.1f}", f"{share:.0%}",
                     f">= {GOAL:.0%}" if is_step else "", verdict(share, GOAL) if is_step else ""])
    print(f"median of {cfg['repeats']} interleaved rounds after {cfg['warmup']} warm-up; peak = best torch.mm = "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(table(["variant", "GFLOP", "ms", "spread", "GFLOP/s", "of peak", "goal", "verdict"], rows))
    for name, step in steps.items():
        _profile(name, step, cfg)


def _compiled(step: Stage2Step) -> tuple[callable, str]:
    """The cached step with its loss compiled; returns the step and a note on the compile time."""
    try:
        loss = torch.compile(step.seg_loss)
        run = step.cached_with_loss(loss)
        start = time.perf_counter()
        run()  # compiles
        return run, f" (compile {time.perf_counter() - start:.0f} s once)"
    except Exception as err:  # no C++ toolchain, unsupported platform...: report, do not stop the suite
        return step.cached, f" (torch.compile failed: {type(err).__name__}; eager shown)"


def _profile(name: str, step: Stage2Step, cfg: dict) -> None:
    """Self CPU time of one cached step by kind of op, and its top ops."""
    batch, _, size, _ = step.cached_batch["target"].shape  # (B, 1, S, S)
    pixel_shapes = ([size, size], [batch, size * size])  # trailing dims of the logits, and flattened (dice)
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(cfg["profile_steps"]):
            step.cached()
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    kinds: dict[str, float] = defaultdict(float)
    for event in events:
        kinds[_kind(event, pixel_shapes)] += event.self_cpu_time_total
    per_step = cfg["profile_steps"]
    print(f"\nprofile of the {name} ({per_step} step(s), torch.profiler self CPU time):")
    print(table(["kind of op", "ms/step", "share"],
                [[kind, f"{us / per_step / 1e3:.1f}", f"{us / total:.0%}"]
                 for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])]))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:cfg["top"]]
    print(table(["top op", "input shapes", "calls/step", "ms/step", "share", "kind"],
                [[e.key, _shapes(e.input_shapes), e.count // per_step,
                  f"{e.self_cpu_time_total / per_step / 1e3:.1f}", f"{e.self_cpu_time_total / total:.0%}",
                  _kind(e, pixel_shapes)] for e in top]))


def _kind(event, pixel_shapes) -> str:
    if event.key in MATMUL_OPS:
        return "matmul / attention"
    for shape in event.input_shapes or ():
        if shape and (list(shape[-2:]) == pixel_shapes[0] or list(shape) == pixel_shapes[1]):
            return "per-pixel (loss, upsample)"
    return "other (norms, GELU, AdamW, copies)"


def _shapes(shapes) -> str:
    text = ", ".join("x".join(map(str, s)) for s in (shapes or ()) if s)
    return text if len(text) <= 40 else text[:37] + "..."


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto writes profiler_start/stop lines straight to file descriptor 2; keep them out of the tables."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
