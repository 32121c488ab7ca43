"""Which torch device a stage runs on (`auto`: CUDA when available, else CPU; `cpu`, `cuda`, `cuda:N`), and which
reduced precision it may autocast to there (`none`, `bf16`, `fp16`)."""

from __future__ import annotations

import torch
from torch import Tensor

from activations import devices
from sae.errors import SAEConfigError

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""TrainConfig.autocast's values and the dtype torch.autocast runs the encoder GEMM and the decode in."""


def check_device_spec(spec: str) -> None:
    """Refuse a device string that is none of the allowed forms (without looking for hardware)."""
    try:
        devices.check_device_spec(spec)
    except devices.DeviceError as exc:
        raise SAEConfigError(str(exc)) from None


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """activations.devices.resolve_device, its errors as SAEConfigError: one clear line when CUDA is asked for and
    torch has none (or not that many GPUs)."""
    try:
        return devices.resolve_device(spec)
    except devices.DeviceError as exc:
        raise SAEConfigError(str(exc)) from None


def to_device(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    """`tensor` on `device` (itself when already there); host-to-CUDA copies go through pinned memory."""
    if tensor is None or tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The dtype autocast `mode` runs in on `device` (None for none): one clear error where the device lacks it.

    CPU autocast runs bf16 and fp16 on any CPU (slowly without native support); a CUDA GPU has bf16 only if torch
    says so natively (compute capability 8.0, Ampere, or newer): emulated bf16 would be slower than fp32.
    """
    if mode not in AUTOCAST_DTYPES:
        raise SAEConfigError(f"unknown autocast {mode!r}; allowed: {', '.join(AUTOCAST_DTYPES)}.")
    if mode == "bf16" and device.type == "cuda" and not _cuda_has_native_bf16(device):
        raise SAEConfigError(
            f"autocast bf16: device {device} ({torch.cuda.get_device_name(device)}) has no native bfloat16 "
            "(torch.cuda.is_bf16_supported(including_emulation=False) is False there; bf16 needs compute capability "
            "8.0 or newer); allowed on it: none, fp16."
        )
    return AUTOCAST_DTYPES[mode]


def _cuda_has_native_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):  # is_bf16_supported asks about the current device
        return torch.cuda.is_bf16_supported(including_emulation=False)
