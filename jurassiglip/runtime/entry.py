"""What every stage entry point shares: logging, params, signals, the tracker.

A stage module is `run(params, tracker)` plus `main = entry(NAME, run)`.
Stage name = module name = output folder `data/<name>/` = MLflow `stage` tag.
Under torchrun, `main` loads params, joins the process group (with
`launcher.timeout_s` as its collective timeout) and gives ranks other than 0
a tracker that records nothing (see distributed.py).

A stage stopped by bad input (`stage_errors`: a bad gRefCOCO file, a
missing or wrong checkpoint, params that do not fit the data, a loss that
is no longer finite) logs one line naming the file, key or step and exits
with 2, like invalid params; its MLflow run is FAILED with the message as
the tag `error`.

SIGTERM (what torchrun sends the other ranks when one fails, and what job
schedulers and `kill` send) stops a stage the way Ctrl-C does: the stage
unwinds, its MLflow run is marked KILLED, and it exits with 128 + 15.
Only SIGKILL leaves a run RUNNING, since nothing can run after it.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

from jurassiglip.config import PARAMS_FILE, ConfigError, load_params
from jurassiglip.runtime import distributed
from jurassiglip.runtime.paths import stage_dir

log = logging.getLogger(__name__)


def setup_logging() -> None:
    """One line per event, with time and module; rank 0 only under torchrun."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Terminated(KeyboardInterrupt):
    """The stage received a termination signal; a KeyboardInterrupt so that everything unwinds as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def stage_errors() -> tuple[type[BaseException], ...]:
    """What stops a stage for a reason its message says in full: bad inputs, not bugs.

    A stage that raises one of these logs the message as one line and exits
    with 2, as for invalid params; anything else keeps its traceback.
    """
    from jurassiglip.data.refs import DataError
    from jurassiglip.model.checkpoint import CheckpointError
    from jurassiglip.training.features import NonFiniteFeatures
    from jurassiglip.training.loop import NonFiniteLoss

    return ConfigError, DataError, CheckpointError, NonFiniteLoss, NonFiniteFeatures


def entry(name: str, run: Callable[..., None]) -> Callable[[], None]:
    """Build the `main()` of a stage module: params -> tracker -> run(params, tracker)."""

    def main() -> None:
        setup_logging()
        signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            _main(name, run)
        except Terminated as err:
            log.error("%s: stopped by %s", name, err)
            raise SystemExit(128 + err.signum) from None

    return main


def _main(name: str, run: Callable[..., None]) -> None:
    """The body of a stage's main(): params, tracker, run, resource log."""
    from jurassiglip.runtime.tracking import NullTracker, Tracker, TrackingError, record_failure

    # Params first: the process group's timeout is one of them.
    try:
        params = load_params(os.environ.get("JURASSIGLIP_PARAMS", PARAMS_FILE))
        params.check_world_size(distributed.env_world_size())
    except ConfigError as err:
        log.error("%s", err)
        # A FAILED MLflow run, so e.g. a queued experiment's bad -S shows there: rank 0's, while the other
        # ranks wait in a group of torch's default timeout (torchrun kills every rank once one has exited).
        with distributed.process_group():
            if distributed.is_main():
                record_failure(name, err)
            distributed.barrier()
        raise SystemExit(2) from None
    with distributed.process_group(params.launcher.timeout_s):  # under torchrun; a no-op otherwise
        start = time.perf_counter()
        log.info("%s: start", name)
        # One MLflow run and one set of DVC files per stage: rank 0's.
        main_rank = distributed.is_main()
        tracking = Tracker.open(name, params, stage_dir(name)) if main_rank else nullcontext(NullTracker())
        try:
            with tracking as tracker:
                run(params, tracker)
                seconds = time.perf_counter() - start
                tracker.log_resources({"wall_seconds": seconds, "peak_rss_mb": peak_rss_mb()})
        except TrackingError as err:  # the store cannot take the run: raised before any work
            log.error("%s", err)
            raise SystemExit(2) from None
        except stage_errors() as err:  # the run is FAILED with the message as its `error` tag (Tracker.open)
            log.debug("%s: where it was raised", name, exc_info=True)
            log.error("%s", err)
            raise SystemExit(2) from None
        log.info("%s: done in %.1f s, peak RSS %.0f MB", name, seconds, peak_rss_mb())
