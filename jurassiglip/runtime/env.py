"""The process's seed, device and precision: what every stage sets up before it builds a model."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from jurassiglip.runtime import distributed


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch seeds every GPU too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    """This process's GPU (its LOCAL_RANK under torchrun), else the CPU."""
    return torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def autocast(dev: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA (as the prototype); plain fp32 on CPU."""
    if dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()
