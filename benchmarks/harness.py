"""Measuring side by side: interleaved timing, FLOP counting, tables, verdicts.

Every comparison in this suite is timed in one process, the variants
interleaved within each repeat (A B, then B A, ...), so a neighbour that
starts or stops using the CPU mid-run slows both variants alike. Medians are
taken after warm-up rounds; the spread (interquartile range / median) is
printed next to them so a noisy figure shows itself.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


@dataclass(frozen=True)
class Options:
    """What every benchmark gets from the command line."""

    quick: bool    # smaller sizes and fewer repeats: checks the suite runs, figures are rough
    threads: int   # torch.set_num_threads, fixed for the whole run
    seed: int      # sample selection and random weights


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one variant over the repeats (warm-up excluded)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Interquartile range / median (0 with fewer than 4 repeats' worth of quartiles)."""
        if len(self.seconds) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return (q3 - q1) / self.median


def interleaved(variants: dict[str, Callable[[], object]], *, repeats: int, warmup: int) -> dict[str, Timing]:
    """Time each variant `repeats` times, alternating their order every round.

    Args:
        variants: name -> a call that does one unit of work (a step, a batch of loads...).
        repeats: timed rounds; each round calls every variant once.
        warmup: untimed rounds first (allocator, caches, page cache, lazy init).

    Returns:
        name -> Timing.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(ts)) for name, ts in times.items()}


# torch's FLOP counter has formulas for the CUDA attention kernels only; on CPU,
# F.scaled_dot_product_attention dispatches to the two ops below, which would
# otherwise count as 0 FLOP (a quarter of a ViT-S/16+ forward at 1029 tokens).
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention; elementwise ops count 0)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def verdict(value: float, goal: float, *, at_most: bool = False) -> str:
    """'PASS' or 'FAIL' of a measured figure against its goal (never asserted)."""
    ok = value <= goal if at_most else value >= goal
    return "PASS" if ok else "FAIL"


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def environment(command: str, threads: int) -> list[str]:
    """Lines that say where and how the figures were taken."""
    load = os.getloadavg()
    return [
        f"date      {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"command   {command}",
        f"machine   {_cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}",
        f"python    {platform.python_version()}, torch {torch.__version__}, "
        f"torch.set_num_threads({threads}) -> {torch.get_num_threads()} intra-op threads, "
        f"{torch.get_num_interop_threads()} inter-op",
        f"load avg  {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) at start: "
        f"{'other processes are using the cores' if load[0] > 0.5 else 'machine mostly idle'}",
    ]


def oversubscription_check(threads: int) -> str:
    """Speed of `threads` intra-op threads relative to one, on a mix of parallel elementwise ops and a matmul.

    On idle cores it is about `threads`x. Below 1x the cores are oversubscribed: OpenMP
    waits at every parallel region for a thread that another process has preempted, which
    slows small ops far more than big matmuls, so ratios between variants are distorted too.
    """
    x, a = torch.randn(1 << 20), torch.randn(512, 512)

    def work(n: int) -> Callable[[], None]:
        def go() -> None:
            torch.set_num_threads(n)
            for _ in range(50):
                x.mul(1.0001).add_(1.0)
            torch.mm(a, a)
        return go

    times = interleaved({1: work(1), threads: work(threads)}, repeats=7, warmup=1)
    torch.set_num_threads(threads)
    ratio = times[1].median / times[threads].median
    state = "OVERSUBSCRIBED, figures distorted (small parallel ops suffer most)" if ratio < 1.0 else "ok"
    return f"{threads} threads = {ratio:.2f}x the speed of 1 thread: {state}"


def load_line() -> str:
    load = os.getloadavg()
    return f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
