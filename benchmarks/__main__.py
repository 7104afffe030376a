"""Run the speed benchmarks: `python -m benchmarks [--quick] [--only R1,R3] [--threads 2]`.

From the repository root; nothing else is needed: the default synthetic
data is built from params.yaml into a temporary folder and the models have
random weights (speed does not depend on them). Each benchmark prints its
table; nothing is asserted. `--quick` shrinks sizes and
repeats so the whole suite checks out in about a minute (its figures are
rough); the figures in benchmarks/README.md come from a full run.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import torch

from benchmarks import eval_scaling, manifest_scale, matmul_share, sample_loading, stage2_epoch, stage2_step
from benchmarks.harness import Options, environment, load_line, oversubscription_check
from benchmarks.setups import offline

BENCHMARKS = {
    "R1": stage2_step,     # stage-2 step: cached features vs towers live, vs the FLOP ratio
    "R2": sample_loading,  # one training sample: manifest vs the prototype's file decode
    "R3": stage2_epoch,    # stage-2 epoch with the DataLoader: prototype-style vs ours
    "R4": eval_scaling,    # evaluation samples/s from 100 to 10,000 samples
    "R5": matmul_share,    # share of the fp32 matmul peak the cached stage-2 step reaches
    "R6": manifest_scale,  # build_manifest at gRefCOCO scale: 1 vs 2 workers, disk per image / caption
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (about a minute)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    chosen = [name.strip().upper() for name in args.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    # `kill` ends the run like Ctrl-C, so the temporary data folders are still removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    offline()
    torch.set_num_threads(args.threads)
    opts = Options(quick=args.quick, threads=args.threads, seed=args.seed)
    command = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
    print("\n".join(environment(command, args.threads)), flush=True)
    start = time.perf_counter()
    for name in chosen:
        begun = time.perf_counter()
        # Other processes come and go: state the conditions of every table, not only of the first.
        check = "; " + oversubscription_check(args.threads) if args.threads > 1 else ""
        print(f"\n[{name}] conditions: {load_line()}{check}", flush=True)
        BENCHMARKS[name].run(opts)
        print(f"({name} took {time.perf_counter() - begun:.0f} s)", flush=True)
    print(f"\nsuite took {time.perf_counter() - start:.0f} s; {load_line()} at the end")


if __name__ == "__main__":
    main()
