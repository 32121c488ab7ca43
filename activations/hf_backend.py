"""A plain Hugging Face causal LM behind the small hook interface the workbench uses (the "hf" backend).

transformer_lens rebuilds a model from its own copy of the weights and knows only the architectures it was
taught; this backend runs ``AutoModelForCausalLM`` as it is, with PyTorch forward hooks on named submodules:

* ``model.layers.6`` — a module's output (for a decoder layer: the residual stream after the block);
* ``model.layers.6.self_attn.o_proj:input`` — a module's first input (for ``o_proj``: the heads' outputs
  concatenated, the per-head ``z`` of transformer_lens' ``hook_z``);
* fnmatch patterns (``model.layers.*.mlp``) expand to every matching module in execution order.

:class:`HFHookedModel` offers what the cache, evaluation, analysis and steering call on a transformer_lens
model — ``hook_dict``, ``run_with_hooks``, ``run_with_cache``, ``model(tokens)`` for logits, ``cfg``,
``tokenizer``, ``W_U`` — so they work on either backend. A cache-only forward stops right after the last
hooked module has run. For RMSNorm models (Llama, SmolLM2) transformer_lens' weight processing leaves the
residual stream unchanged, so ``model.layers.L`` equals ``blocks.L.hook_resid_post`` to float tolerance; with
LayerNorm, transformer_lens centres every write into the residual stream, and the two differ by each row's
mean over d_model (docs/ALGORITHMS.md §1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from activations.hooks import INPUT_SUFFIX  # a hook name ending in it reads the module's first input

BACKENDS = ("transformer_lens", "hf")


class _StopForward(Exception):
    """Raised by the last hook of a cache-only forward: nothing after it is needed."""


@dataclass
class HFConfig:
    """The transformer_lens-style config fields the workbench reads."""

    model_name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int
    device: str = "cpu"
    normalization_type: str | None = None  # the final norm is applied inside the HF model, not by callers


@dataclass(frozen=True)
class HookPoint:
    """What a hook function receives as its second argument (it reads ``.name``, as with transformer_lens)."""

    name: str


def backend_of_hook(hook: str) -> str:
    """transformer_lens hook names all contain "hook_"; module paths of a HF model do not."""
    return "transformer_lens" if "hook_" in hook else "hf"


class HFHookedModel(torch.nn.Module):
    """A HF causal LM with named hook points on its submodules (see the module docstring)."""

    backend = "hf"

    def __init__(self, hf_model, tokenizer, name: str):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer
        config = hf_model.config
        text = getattr(config, "text_config", None) or config
        self.cfg = HFConfig(
            model_name=name,
            n_layers=int(text.num_hidden_layers),
            d_model=int(text.hidden_size),
            n_heads=int(getattr(text, "num_attention_heads", 0) or 0),
            d_vocab=int(text.vocab_size),
            device=str(next(hf_model.parameters()).device),
        )
        self._modules_by_name = {n: m for n, m in hf_model.named_modules() if n}
        self.hook_dict: dict[str, torch.nn.Module] = {}
        for module_name, module in self._modules_by_name.items():
            self.hook_dict[module_name] = module
            self.hook_dict[module_name + INPUT_SUFFIX] = module

    def to(self, *args, **kwargs):  # keep cfg.device in step, as transformer_lens does
        super().to(*args, **kwargs)
        self.cfg.device = str(next(self.hf.parameters()).device)
        return self

    @property
    def W_U(self) -> torch.Tensor:
        """[d_model, d_vocab]: the unembedding with the final norm's weight folded in, as transformer_lens'
        processed W_U (a residual direction times W_U is its logit-lens effect)."""
        weight = self.hf.get_output_embeddings().weight  # [d_vocab, d_model]
        norm = getattr(getattr(self.hf, "model", None), "norm", None)
        scale = getattr(norm, "weight", None)
        w_u = weight.T
        return w_u * scale[:, None] if scale is not None and scale.shape == (w_u.shape[0],) else w_u

    def new_kv_cache(self, n_rows: int):
        """An empty key/value cache for incremental generation (pass it as ``past_kv_cache``)."""
        del n_rows  # a DynamicCache grows with the batch it first sees
        from transformers import DynamicCache

        return DynamicCache()

    def forward(self, tokens: torch.Tensor, past_kv_cache=None, **kwargs) -> torch.Tensor:
        if kwargs.get("start_at_layer") is not None or kwargs.get("stop_at_layer") is not None:
            raise TypeError("the hf backend runs whole forwards (with hooks); it has no start/stop_at_layer")
        tokens = tokens.to(self.cfg.device)
        if past_kv_cache is None:
            return self.hf(input_ids=tokens, use_cache=False).logits
        return self.hf(input_ids=tokens, past_key_values=past_kv_cache, use_cache=True).logits

    def run_with_hooks(
        self,
        tokens: torch.Tensor,
        fwd_hooks: list[tuple[str, Callable[[torch.Tensor, Any], torch.Tensor | None]]] = (),
        stop_at_layer: int | None = None,
        return_type: str | None = "logits",
        past_kv_cache=None,
    ) -> torch.Tensor | None:
        """Run the model with ``fn(activation, hook)`` at each named point; a returned tensor replaces the
        activation. return_type None: nothing after the last hook point is run (the cache's case)."""
        del stop_at_layer  # the forward stops after the last hook point instead, whichever block it is in
        pending = {name for name, _ in fwd_hooks}
        stop_early = return_type is None
        handles = []

        def finished(name: str) -> None:
            pending.discard(name)
            if stop_early and not pending:
                raise _StopForward

        for name, fn in fwd_hooks:
            if name not in self.hook_dict:
                raise KeyError(name)
            module, point = self.hook_dict[name], HookPoint(name)
            if name.endswith(INPUT_SUFFIX):
                handles.append(module.register_forward_pre_hook(_input_hook(fn, point, finished)))
            else:
                handles.append(module.register_forward_hook(_output_hook(fn, point, finished)))
        try:
            logits = self.forward(tokens, past_kv_cache=past_kv_cache)
        except _StopForward:
            return None
        finally:
            for handle in handles:
                handle.remove()
        return None if return_type is None else logits

    def run_with_cache(self, tokens: torch.Tensor, names_filter: list[str]) -> tuple[torch.Tensor, dict]:
        """Logits and the activation at each named point (detached)."""
        cache: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = act.detach()

        logits = self.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names_filter])
        return logits, cache


def _output_hook(fn, point: HookPoint, finished: Callable[[str], None]):
    def hook(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        new = fn(tensor, point)
        finished(point.name)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _input_hook(fn, point: HookPoint, finished: Callable[[str], None]):
    def hook(module, args):
        new = fn(args[0], point)
        finished(point.name)
        return None if new is None else (new, *args[1:])

    return hook
