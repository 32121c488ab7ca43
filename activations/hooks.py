"""Which hooks can be cached, their widths, and how far the forward pass must run.

Hook names are transformer_lens hook names, or module paths of a HF model on the "hf" backend
(activations/hf_backend.py); on either, fnmatch patterns expand to every matching name.
"""

from __future__ import annotations

import difflib
import fnmatch
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


INPUT_SUFFIX = ":input"  # the hf backend's "module input" hook points (activations/hf_backend.py)


def is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def matches(name: str, pattern: str) -> bool:
    """fnmatch per dotted segment: ``*`` stays inside one segment, so ``model.layers.*`` is the blocks
    themselves, not every module inside them."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, wanted, strict=True))


def expand_hooks(model, names: list[str]) -> list[str]:
    """Names with fnmatch patterns replaced by the model's matching hook names, in the model's order (a
    pattern reaches a module's ``:input`` point only when it ends in ``:input`` itself)."""
    known = list(model.hook_dict)
    out: list[str] = []
    for name in names:
        if not is_pattern(name):
            out.append(name)
            continue
        inputs = name.endswith(INPUT_SUFFIX)
        found = [h for h in known if matches(h, name) and h.endswith(INPUT_SUFFIX) == inputs]
        if not found:
            near = difflib.get_close_matches(re.sub(r"[*?]|\[[^]]*\]", "0", name), known, n=5, cutoff=0.5)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise HookError(f"the pattern {name!r} matches no hook of {model.cfg.model_name}{hint}")
        out.extend(h for h in found if h not in out)
    return out


def resolve_hooks(model, names: list[str]) -> list[HookSpec]:
    """Expand patterns, check every name against the model and measure its flattened width with a 2-token
    probe. A pattern whose matches differ in width is refused with the widths named (an SAE reads one width)."""
    if not names:
        raise HookError("give at least one --hook, e.g. blocks.6.hook_resid_post")
    patterns = {name: expand_hooks(model, [name]) for name in names if is_pattern(name)}
    names = expand_hooks(model, names)
    if len(set(names)) != len(names):
        raise HookError(f"hook names repeat: {names}")
    known = list(model.hook_dict)
    for name in names:
        if name not in model.hook_dict:
            near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            what = "module" if getattr(model, "backend", "") == "hf" else "hook"
            raise HookError(f"unknown {what} {name!r} for {model.cfg.model_name} ({model.cfg.n_layers} layers){hint}")
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
    widths = {spec.name: spec.d_in for spec in out}
    for pattern, matched in patterns.items():
        if len({widths[m] for m in matched}) > 1:
            listed = ", ".join(f"{m} ({widths[m]})" for m in matched)
            raise HookError(f"the pattern {pattern!r} matches hooks of different widths: {listed}; an SAE reads one "
                            "width, so narrow the pattern")
    return out
