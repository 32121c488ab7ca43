"""Starting and leaving a torchrun data-parallel run (the maths lives in sae/distributed.py).

`torchrun --nproc-per-node N -m experiments.train ...` (or `... -m experiments.cli train ...`) sets
WORLD_SIZE; `process_group` then joins the ranks (gloo on CPU; with CUDA each rank on GPU LOCAL_RANK, NCCL for CUDA
tensors and gloo for CPU ones) and
`leave_rank` ends each process once every output is written.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for_this_machine() -> str:
    """gloo on a machine without CUDA; with CUDA, each rank takes GPU LOCAL_RANK (so `--device auto` or `cuda` is
    that rank's own GPU) and collectives go through NCCL for CUDA tensors and gloo for CPU ones."""
    if not torch.cuda.is_available():
        return "gloo"
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return "cpu:gloo,cuda:nccl"


class process_group:
    """Initialise torch.distributed when torchrun started this process (WORLD_SIZE > 1); tear it down after."""

    def __enter__(self) -> None:
        self.started = launched_by_torchrun()
        if self.started:
            dist.init_process_group(backend_for_this_machine())

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.started:
            if exc_type is None:  # wait for rank 0's saving and evaluation: gloo aborts a rank that leaves early
                dist.barrier()
            dist.destroy_process_group()


def leave_rank(code: int) -> int:
    """Under torchrun, exit now with `code`: the process group is destroyed and every output written, and
    interpreter finalisation is where gloo's worker threads can abort a process ("terminate called without
    an active exception"). Otherwise return `code`."""
    if not launched_by_torchrun():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
