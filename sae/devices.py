"""Which torch device a stage runs on: `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from sae.errors import SAEConfigError

DEVICE_HELP = ("auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N; trained SAEs and checkpoints are "
               "saved on the CPU either way, so a run resumes or loads on any device")


def check_device_spec(spec: str) -> None:
    """Refuse a device string that is none of the allowed forms (without looking for hardware)."""
    if not isinstance(spec, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise SAEConfigError(f"device must be {DEVICE_HELP.split(';')[0]}, got {spec!r}.")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device `spec` names, checked against the hardware: one clear error when CUDA is asked for and
    torch has none (or not that many GPUs)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec or "auto"
    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SAEConfigError(f"device {spec!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                                 "False); use device cpu or auto.")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise SAEConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    return torch.device(spec)


def to_device(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    """`tensor` on `device` (itself when already there); host-to-CUDA copies go through pinned memory."""
    if tensor is None or tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
