"""Data-parallel training on PyTorch's own engine: torchrun, a process group, DDP.

Everything the training code needs to know about other processes is here.
A stage launched with `torchrun --nproc_per_node=N -m stages.<name>` finds
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in its environment;
`process_group(timeout_s)` joins the group (nccl on CUDA, gloo on CPU) with
`launcher.timeout_s` as the longest a rank waits at a collective. Launched
with plain `python`, no group exists and every helper below is a no-op
that returns its input, so the single-process path runs exactly the code
it ran before DDP existed.

The split of work, for reference:
- batch sizes in params.yaml are global; each rank takes batch / world_size
  samples, a strided slice of one shared permutation (data/datasets.py);
- `data_parallel` wraps what a step trains in DistributedDataParallel, which
  averages the gradients over ranks during backward;
- the contrastive loss gathers every rank's features (`gather_with_grad`), so
  each caption meets the negatives of the whole global batch;
- losses that leave the step are averaged over ranks (`all_reduce_sum`), so
  early stopping decides the same on every rank;
- the stage-2 feature cache is built by all ranks together, each encoding
  its share into files rank 0 preallocated (features.py);
- rank 0 alone logs, writes checkpoints, metrics files and the MLflow run.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


# -- the process group -------------------------------------------------------

@contextmanager
def process_group(timeout_s: float | None = None) -> Iterator[None]:
    """Join the process group torchrun describes in the environment for the body; leave it afterwards.

    No-op without torchrun (or with a single process): WORLD_SIZE absent or 1.
    On CUDA each process takes the GPU of its LOCAL_RANK and talks nccl;
    on CPU, gloo. Rendezvous (single node, multi-node, elastic) is torchrun's
    business: the `env://` init reads what it set.

    Args:
        timeout_s: how long a rank waits at a collective (and at the rendezvous)
            before failing, e.g. while the others encode the feature cache;
            None keeps torch's default.
    """
    if env_world_size() <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    log.info("process group: %s, %d ranks, collective timeout %s", backend, dist.get_world_size(),
             "default" if timeout is None else f"{timeout_s:g} s")
    try:
        yield
    finally:
        dist.destroy_process_group()


def env_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), readable before the group is joined; 1 without."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Index of this process on its machine (its GPU under torchrun); 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the one process that logs, checkpoints and tracks."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# -- collectives -------------------------------------------------------------

def _comm_device() -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA tensors of this rank's GPU."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over all ranks of a few numbers (one collective); the values themselves alone."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; the value itself in a single process."""
    if not is_distributed():
        return value
    holder = [value if is_main() else None]
    dist.broadcast_object_list(holder, src=0, device=_comm_device())
    return holder[0]


def check_same(value: int, what: str) -> None:
    """Raise on every rank unless all ranks hold the same `value` (a decision they must take together)."""
    if not is_distributed():
        return
    values = [int(v) for v in all_gather(torch.tensor([value], dtype=torch.int64, device=_comm_device())).tolist()]
    if len(set(values)) > 1:
        raise RuntimeError(f"ranks disagree on {what}: {values} (rank 0 first); are all nodes looking at "
                           f"the same files? The pipeline's data/ folder must be on a filesystem they share")


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Rank-ordered concatenation along dim 0 of every rank's `tensor` (same shape on every rank), no gradient."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient of its own rows, summed over ranks.

    Every rank's loss reads every rank's rows, so the gradient of this rank's
    rows is the sum of what all ranks' losses send back. When all ranks
    compute the same global loss L, that sum is world_size x dL/d(rows);
    DDP's mean over ranks then divides the world_size out again, so the
    parameter gradients equal those of one process on the whole batch.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.rows = tensor.shape[0]
        return all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(b, ...) rows of this rank -> (world_size * b, ...) rows of all ranks, differentiable.

    The identity in a single process.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


# -- DDP ---------------------------------------------------------------------

class _Forward(nn.Module):
    """Makes `fn(model, *args)` the forward of a module, so DDP can wrap exactly what a step computes."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.model, *args)


def data_parallel(model: nn.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(model, *args)` as a callable whose backward averages gradients over ranks.

    Under torchrun: a DistributedDataParallel module over `fn` (call it like
    `fn` without the model). It syncs the parameters that require grad at the
    time of the call, so set the trainable parameters first; construction
    broadcasts rank 0's weights, so every rank starts identical. In a single
    process: `fn` bound to the model, nothing else.

    Args:
        model: the whole model (its state_dict stays unprefixed; save that, not the wrapper).
        fn: computes what the loss reads, e.g. features and the logit scale.
    """
    if not is_distributed():
        return functools.partial(fn, model)
    device_ids = [local_rank()] if next(model.parameters()).is_cuda else None
    # No buffer broadcast before every forward: the towers' buffers (normalisation constants,
    # position ids) never change after the broadcast at construction.
    return DistributedDataParallel(_Forward(model, fn), device_ids=device_ids, forward_sync_buffers=False)


def no_sync(forward: Callable[..., Any]):
    """Context in which backward passes through `forward` accumulate gradients without syncing ranks.

    For all but the last of several backward passes of one step; a no-op
    outside DDP.
    """
    return forward.no_sync() if isinstance(forward, DistributedDataParallel) else nullcontext()
