"""Which transformer_lens hooks can be cached, their widths, and how far the forward pass must run."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch

# These carry [batch, head, query, key] maps, not one vector per token: they cannot be SAE rows.
NOT_ROW_HOOKS = ("hook_pattern", "hook_attn_scores")


class HookError(ValueError):
    """A hook name the model does not have, or one whose activations are not one vector per token."""


@dataclass(frozen=True)
class HookSpec:
    """A cacheable hook: its name, its block (None outside blocks) and its flattened width."""

    name: str
    layer: int | None
    d_in: int


def hook_layer(name: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def stop_layer(specs: list[HookSpec], n_layers: int) -> int | None:
    """The ``stop_at_layer`` that still runs every hook; None when a hook lies after the last block."""
    if any(s.layer is None and not s.name.startswith("hook_") for s in specs):
        return None  # ln_final.* and unembed hooks need the whole model
    last = max((s.layer for s in specs if s.layer is not None), default=-1)
    return None if last + 1 >= n_layers else last + 1


def resolve_hooks(model, names: list[str]) -> list[HookSpec]:
    """Check every name against the model and measure its flattened width with a 2-token probe."""
    if not names:
        raise HookError("give at least one --hook, e.g. blocks.6.hook_resid_post")
    if len(set(names)) != len(names):
        raise HookError(f"hook names repeat: {names}")
    known = list(model.hook_dict)
    for name in names:
        if name not in model.hook_dict:
            near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise HookError(f"unknown hook {name!r} for {model.cfg.model_name} ({model.cfg.n_layers} layers){hint}")
        if name.endswith(NOT_ROW_HOOKS):
            raise HookError(
                f"hook {name!r} holds attention maps, not one vector per token; cache hook_z, hook_resid_* "
                "or hook_*_out instead"
            )
    shapes: dict[str, tuple[int, ...]] = {}

    def record(act: torch.Tensor, hook) -> None:
        shapes[hook.name] = tuple(act.shape)

    probe = torch.zeros((1, 2), dtype=torch.long)
    specs = [HookSpec(n, hook_layer(n), 0) for n in names]
    with torch.no_grad():
        model.run_with_hooks(
            probe,
            fwd_hooks=[(n, record) for n in names],
            stop_at_layer=stop_layer(specs, model.cfg.n_layers),
            return_type=None,
        )
    out = []
    for spec in specs:
        shape = shapes.get(spec.name)
        if shape is None or len(shape) < 3 or shape[:2] != (1, 2):
            raise HookError(f"hook {spec.name!r} did not produce a [batch, pos, ...] activation (got {shape})")
        width = 1
        for dim in shape[2:]:
            width *= dim
        out.append(HookSpec(spec.name, spec.layer, width))
    return out
