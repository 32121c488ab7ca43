"""`sae.load`: the SAE a folder describes, built with its registered class (files are read by sae/io.py).

Nothing the folder claims is trusted before it is checked: cfg.json must be a JSON object, and the
tensor shapes in the safetensors headers must match the sizes the config names before any tensor is
read or the module is allocated; weights must be finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae.base import SAE
from sae.devices import resolve_device
from sae.errors import SAEConfigError
from sae.hub import download_sae_folder, hub_name_of
from sae.io import (
    WEIGHTS_FILENAME,
    check_workbench_shapes,
    folder_metadata,
    header_shapes,
    read_cfg,
    read_saelens,
    read_workbench_state,
    workbench_config,
)
from sae.pretrained import is_pretrained_name, pretrained_folder
from sae.registry import get_architecture


def load_sae(path: str | Path, device: str | None = None) -> SAE:
    """Load a folder written by `SAE.save` exactly, or a SAELens topk/jumprelu/standard folder; or one on the Hugging
    Face Hub by name, `hf://ORG/REPO[/SUBFOLDER][@REVISION]` (sae/hub.py: downloaded once into the HF cache, then
    read from there, offline too), or by its SAELens registry name `RELEASE/SAE_ID` when sae_lens is installed
    (sae/pretrained.py; a local path that exists wins). device: where to put it (sae/devices.py: auto, cpu, cuda,
    cuda:N; default: the CPU, where saved files always are).

    Every problem is one SAEConfigError (SAEDataError when a hub SAE is not cached and the Hub is out of reach)
    that names the folder, or the hub name.
    """
    target = resolve_device(device) if device is not None else None  # a bad device fails before any reading
    name = hub_name_of(path)
    if name is not None:
        folder = download_sae_folder(name)
    elif is_pretrained_name(path):  # RELEASE/SAE_ID of SAELens' registry (sae/pretrained.py)
        name = str(path)
        folder = pretrained_folder(name)
    else:
        folder = Path(path)
    label = name or str(folder)  # a hub SAE's message keeps its cache path too
    try:
        model = _load_checked(folder)
    except SAEConfigError as exc:
        message = str(exc)
        raise SAEConfigError(message if label in message else f"{label}: {message}") from None
    return model if target is None else model.to(target)


def _load_checked(path: Path) -> SAE:
    cfg = read_cfg(path)
    shapes = header_shapes(path / WEIGHTS_FILENAME)
    if "workbench" in cfg:
        return _load_workbench(path, cfg, shapes)
    sae_cfg, state, metadata = read_saelens(cfg, shapes, path / WEIGHTS_FILENAME)
    sae = get_architecture(sae_cfg.arch)(sae_cfg)
    sae.load_state_dict(state)
    sae.metadata = metadata
    return sae


def _load_workbench(path: Path, cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> SAE:
    sae_cfg = workbench_config(path, cfg)
    cls = get_architecture(sae_cfg.arch)
    with torch.device("meta"):  # the shapes this config implies, allocating nothing
        expected = {name: tuple(t.shape) for name, t in cls(sae_cfg).state_dict().items()}
    check_workbench_shapes(path, shapes, expected, cls.optional_state, sae_cfg)
    sae = cls(sae_cfg)
    state = read_workbench_state(path)
    initial = sae.state_dict()
    for name in sae.optional_state:  # saved before this buffer existed
        state.setdefault(name, initial[name])
    sae.load_state_dict({name: state[name] for name in expected})
    sae.metadata = folder_metadata(cfg)
    sae.training_info = cfg["workbench"].get("training", {})
    return sae
