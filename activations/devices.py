"""Which torch device a stage runs on: `auto` (CUDA when torch sees a GPU, else CPU), `cpu`, `cuda` or `cuda:N`.

The one parser of device names for every stage (the cache here; the trainer, evaluation and analysis through
sae/devices.py, which turns DeviceError into its own SAEConfigError).
"""

from __future__ import annotations

import re

import torch

DEVICE_HELP = ("auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N; trained SAEs and checkpoints are "
               "saved on the CPU either way, so a run resumes or loads on any device")


class DeviceError(ValueError):
    """A device name of none of the allowed forms, or a CUDA device this machine does not have."""


def check_device_spec(spec: str) -> None:
    """Refuse a device string that is none of the allowed forms (without looking for hardware)."""
    if not isinstance(spec, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise DeviceError(f"device must be {DEVICE_HELP.split(';')[0]}, got {spec!r}.")


def model_device(model) -> torch.device:
    """The device a loaded transformer_lens (or hf-backend) model runs on: its outputs land there, so its inputs and
    whatever meets its outputs go there too."""
    return torch.device(str(getattr(model.cfg, "device", "cpu")))


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
            raise DeviceError(f"device {spec!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                              "False); use device cpu or auto.")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    return torch.device(spec)
