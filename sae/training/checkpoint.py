"""Atomic training checkpoints (no pickles), so a run can stop anywhere and resume exactly.

Layout of <checkpoint_dir>/step_<9-digit step>/:
  cfg.json, sae_weights.safetensors, workbench_state.safetensors  - the SAE (sae/io.py)
  trainer_state.safetensors  - Adam moments/steps ("adam.<param>.<field>") and latent counters
                               ("tracker.<name>")
  trainer_state.json         - step, tokens seen, configs, format_version
Each checkpoint is written into a hidden temporary folder and renamed into place, so a crash never
leaves a half-written step_* folder, and older checkpoints are deleted only after that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae.base import SAE
from sae.config import SAEConfig, TrainConfig, config_diff, fields_with_role
from sae.errors import SAEConfigError
from sae.loading import load_sae
from sae.training.tracking import FeatureTracker

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class Checkpointer:
    """Writes, lists, prunes and reads checkpoints in one directory."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(
        self, step: int, sae: SAE, optimizer: torch.optim.Optimizer, tracker: FeatureTracker, state: dict[str, Any]
    ) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step_{step:09d}"
        if final.exists():
            raise SAEConfigError(f"checkpoint {final} already exists; refusing to overwrite it.")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:09d}-", dir=self.directory))
        try:
            sae.save(tmp)
            tensors = {f"adam.{k}": v for k, v in optimizer_tensors(sae, optimizer).items()}
            tensors.update({f"tracker.{k}": v.cpu().contiguous() for k, v in tracker.state_tensors().items()})
            save_file(tensors, str(tmp / STATE_TENSORS))
            with open(tmp / STATE_JSON, "w") as f:
                json.dump(state, f, indent=2)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


STATE_KEYS = ("step", "sae_config", "train_config")
"""What a resume reads from trainer_state.json."""


def read_checkpoint(path: Path) -> tuple[SAE, dict[str, torch.Tensor], dict[str, Any]]:
    """(SAE, trainer tensors, trainer JSON state) from one checkpoint folder; damage is one SAEConfigError."""
    fix = f"delete {path} to resume from the checkpoint before it (or from scratch)"
    try:
        state = json.loads((path / STATE_JSON).read_text())
    except FileNotFoundError:
        raise SAEConfigError(f"checkpoint {path} has no {STATE_JSON}; {fix}.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SAEConfigError(f"checkpoint {path}: {STATE_JSON} is not valid JSON ({exc}); {fix}.") from None
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS) or not isinstance(
        state.get("step"), int
    ):
        raise SAEConfigError(f"checkpoint {path}: {STATE_JSON} lacks {', '.join(STATE_KEYS)}; {fix}.")
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as exc:  # missing, truncated or not a safetensors file
        raise SAEConfigError(f"checkpoint {path}: {STATE_TENSORS} is unreadable ({exc}); {fix}.") from None
    try:
        return load_sae(path), tensors, state
    except SAEConfigError as exc:
        raise SAEConfigError(f"{exc} ({fix})") from None


def config_changes(state: dict[str, Any], sae_cfg: SAEConfig, train_cfg: TrainConfig) -> list[str]:
    """'key: saved -> current' per setting that differs from a checkpoint's trainer_state.json.

    The run_only TrainConfig fields (sae.config.fields_with_role("run_only")) do not change the trained
    weights, so a resume may change them.
    """
    free = fields_with_role("run_only")

    def semantic(train_config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in train_config.items() if k not in free}

    return config_diff(state["sae_config"], dataclasses.asdict(sae_cfg)) + config_diff(
        semantic(state["train_config"]), semantic(dataclasses.asdict(train_cfg))
    )


def optimizer_tensors(sae: SAE, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state keyed '<param name>.<field>' (optimizer built on named_parameters order)."""
    names = [name for name, _ in sae.named_parameters()]
    out: dict[str, torch.Tensor] = {}
    for index, fields in optimizer.state_dict()["state"].items():
        for field, value in fields.items():
            out[f"{names[index]}.{field}"] = torch.as_tensor(value).cpu().contiguous()
    return out


def restore_optimizer(sae: SAE, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors` for the `adam.*` entries of a checkpoint."""
    index = {name: i for i, (name, _) in enumerate(sae.named_parameters())}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            name, field = key.removeprefix("adam.").rsplit(".", 1)
            state.setdefault(index[name], {})[field] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)
