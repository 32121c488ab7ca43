"""Evaluation with the language model in the loop: CE clean / SAE-spliced / zero-ablated, CE recovered, KL.

Our choices (docs/ALGORITHMS.md §7): the reconstruction is spliced at every non-BOS position (BOS is never
a training row, and replacing the attention sink would measure the sink, not the SAE); CE and KL are
averaged over positions whose next token is not BOS. Zero-ablation zeroes the same non-BOS positions by
default; ``zero_ablate_bos=True`` zeroes BOS too, as SAELens' ``get_recons_loss`` does (on the demo TopK
SAE that moves CE_zero from 14.54 to 10.80 nats and CE recovered from 0.940 to 0.909). For ``hook_z`` the
whole [n_heads*d_head] row is replaced and reshaped back, so zero-ablation zeroes every head at that layer.

A gradient SAE (g-SAE, §5) selects latents with the clean model's loss gradient at the hook: it is scored
under both rules, "gradient selection" (the gradient from one forward + backward of the clean model on the
evaluation tokens) and "plain TopK at inference" (no gradient), and every report names the rule it used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import activations
import sae as sae_lib
from activations.cache import CacheConfig, make_tokens, next_token_ce_sum
from activations.hooks import HookSpec, resolve_hooks
from sae.errors import SAEDataError

Reconstruct = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""rows [n, d] at the spliced positions (and the clean loss gradient there, or None) -> replacement rows."""
GRADIENT_RULE, PLAIN_TOPK_RULE = "gradient selection", "plain TopK at inference"


def selection_rule(sae_model, with_grads: bool) -> str:
    """The inference rule an evaluation of this SAE uses, as reports print it."""
    if sae_model.needs_grads:
        return GRADIENT_RULE if with_grads else PLAIN_TOPK_RULE
    return "thresholds (JumpReLU)" if sae_model.calibration_rule else "TopK"


def _splice(hook_name: str, replace: Reconstruct, keep: torch.Tensor, grads: torch.Tensor | None):
    """A forward hook that swaps the activation at the ``keep`` positions for ``replace(rows, grads)``."""

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        shape = act.shape
        rows = act.reshape(shape[0], shape[1], -1)
        new = rows.clone()
        g = None if grads is None else grads.reshape(shape[0], shape[1], -1)[keep]
        new[keep] = replace(rows[keep], g).to(rows.dtype)
        return new.reshape(shape)

    return (hook_name, hook)


def _zeros(rows: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(rows)


def ce_and_kl(logits: torch.Tensor, clean_logprobs: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """Summed next-token CE and summed KL(clean || new) over masked positions."""
    logprobs = logits[:, :-1].float().log_softmax(-1)
    nll = -logprobs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    kl = (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)
    return float((nll * mask).sum()), float((kl * mask).sum())


def clean_logits_and_hook_grads(model, hook_name: str, tokens: torch.Tensor, bos_id: int):
    """One clean forward + backward: logits and d(summed next-token CE)/d(activation at the hook).

    The same loss as `saewb cache --with-grads` (a sum over non-BOS targets), so an SAE sees the
    gradients it was trained with.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook) -> torch.Tensor:
        captured["act"] = act.detach().requires_grad_(True)
        return captured["act"]

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, keep)])
        (grads,) = torch.autograd.grad(next_token_ce_sum(logits, tokens, bos_id), [captured["act"]])
    return logits.detach(), grads


@torch.no_grad()
def model_in_the_loop(
    model,
    hook: HookSpec,
    reconstruct: Callable[[torch.Tensor], torch.Tensor] | dict[str, Reconstruct],
    tokens: np.ndarray,
    bos_id: int,
    batch_size: int = 16,
    with_grads: bool = False,
    zero_ablate_bos: bool = False,
) -> dict:
    """CE of the clean model, with each reconstruction spliced in, and with the hook zero-ablated.

    reconstruct: one function of the rows, or named functions of (rows, clean gradient or None); the
    clean and zero-ablated runs are shared. with_grads: compute the clean loss gradient at the hook
    (one backward per batch) and pass it. Returns the metrics of the first (or only) reconstruction,
    with the others under their names.
    """
    named = reconstruct if isinstance(reconstruct, dict) else {"sae": lambda rows, g: reconstruct(rows)}
    totals = {"clean": 0.0, "zero": 0.0, "kl_zero": 0.0, "n": 0.0}
    totals.update({f"{key}_{name}": 0.0 for name in named for key in ("ce", "kl")})
    for b0 in range(0, tokens.shape[0], batch_size):
        x = torch.from_numpy(np.asarray(tokens[b0 : b0 + batch_size]).astype(np.int64))
        keep = x != bos_id
        mask = (x[:, 1:] != bos_id).float()
        if with_grads:
            clean, grads = clean_logits_and_hook_grads(model, hook.name, x, bos_id)
        else:
            clean, grads = model(x), None
        clean_lp = clean[:, :-1].float().log_softmax(-1)
        totals["clean"] += ce_and_kl(clean, clean_lp, x, mask)[0]
        for name, fn in named.items():
            spliced = model.run_with_hooks(x, fwd_hooks=[_splice(hook.name, fn, keep, grads)])
            ce, kl = ce_and_kl(spliced, clean_lp, x, mask)
            totals[f"ce_{name}"] += ce
            totals[f"kl_{name}"] += kl
        zero_at = torch.ones_like(keep) if zero_ablate_bos else keep
        ce_zero, kl_zero = ce_and_kl(model.run_with_hooks(x, fwd_hooks=[_splice(hook.name, _zeros, zero_at, None)]),
                                     clean_lp, x, mask)
        totals["zero"] += ce_zero
        totals["kl_zero"] += kl_zero
        totals["n"] += float(mask.sum())
    n = max(totals["n"], 1.0)
    ce_clean, ce_zero, kl_zero = totals["clean"] / n, totals["zero"] / n, totals["kl_zero"] / n
    reports = {}
    for name in named:
        ce_sae, kl_sae = totals[f"ce_{name}"] / n, totals[f"kl_{name}"] / n
        reports[name] = {
            "ce_loss_clean": ce_clean,
            "ce_loss_sae": ce_sae,
            "ce_loss_zero": ce_zero,
            "ce_loss_recovered": ce_loss_recovered(ce_clean, ce_sae, ce_zero),
            "delta_ce": ce_sae - ce_clean,
            "kl_div": kl_sae,
            "kl_div_zero": kl_zero,
            "kl_score": (kl_zero - kl_sae) / kl_zero if kl_zero > 0 else float("nan"),
            "ce_eval_tokens": int(totals["n"]),
            "zero_ablate_bos": zero_ablate_bos,
        }
    first, *others = named
    return {**reports[first], **{name: reports[name] for name in others}}


def sae_in_the_loop(model, sae_model, hook: str, token_ids: np.ndarray, zero_ablate_bos: bool = False) -> dict:
    """model_in_the_loop with an SAE's reconstruction, after checking it fits the model's hook.

    A gradient SAE is scored with its gradient rule (main keys) and as plain TopK (under "plain_topk").
    """
    spec = resolve_hooks(model, [hook])[0]
    if spec.d_in != sae_model.cfg.d_in:
        raise SAEDataError(
            f"the SAE has d_in={sae_model.cfg.d_in} but {model.cfg.model_name} has width {spec.d_in} at {hook}"
        )

    def with_rule(use_grads: bool) -> Reconstruct:
        return lambda rows, g: sae_model(rows, g.to(rows.dtype) if use_grads else None).to(rows.dtype)

    named = {"sae": with_rule(sae_model.needs_grads)}
    if sae_model.needs_grads:
        named["plain_topk"] = with_rule(False)
    result = model_in_the_loop(model, spec, named, token_ids, int(model.tokenizer.bos_token_id),
                               with_grads=sae_model.needs_grads, zero_ablate_bos=zero_ablate_bos)
    result["ce_selection_rule"] = selection_rule(sae_model, sae_model.needs_grads)
    if "plain_topk" in result:
        result["plain_topk"]["ce_selection_rule"] = PLAIN_TOPK_RULE
    return result


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean): 1 for a perfect splice, 0 for one as bad as zeroing."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_sae) / gap if gap != 0 else float("nan")


def evaluate_sae(
    sae_dir: str,
    activations_dir: str,
    model_name: str | None = None,
    dataset: str | None = None,
    tokens: int = 8192,
    max_rows: int = 262_144,
    hook: str | None = None,
    zero_ablate_bos: bool = False,
) -> dict:
    """The `saewb eval` report: reconstruction metrics on the cache, plus CE/KL when a model is given."""
    model_sae = sae_lib.load(sae_dir)
    cache = activations.load_cache(activations_dir)
    hook = hook or (getattr(model_sae, "metadata", None) or {}).get("hook_name") or cache.hooks[0]
    if hook not in cache.hooks:
        raise activations.CacheError(f"the SAE reads hook {hook!r}, but {activations_dir} holds {cache.hooks}")
    d_cache = int(cache.manifest["d_in"][hook])
    if d_cache != model_sae.cfg.d_in:
        raise sae_lib.SAEDataError(
            f"the SAE has d_in={model_sae.cfg.d_in} but {activations_dir} has width {d_cache} at {hook}"
        )
    n = min(max_rows, cache.n_tokens)
    metrics, _ = cache_metrics(model_sae, cache, hook, n)
    result = {
        "l0": metrics["l0"],
        "fvu": metrics["fvu"],
        "explained_variance": metrics["explained_variance"],
        "dead_fraction": metrics["dead_frac"],
        "dense_fraction": metrics["dense_frac"],
        "ce_loss_clean": None,
        "ce_loss_sae": None,
        "ce_loss_zero": None,
        "ce_loss_recovered": None,
        "kl_div": None,
        "l0_std": metrics["l0_std"],
        "nmse0": metrics["nmse0"],
        "cosine": metrics["cosine"],
        "eval_rows": n,
        "hook": hook,
        "selection_rule": metrics["selection_rule"],
    }
    if "plain_topk" in metrics:
        result["plain_topk"] = {
            k: metrics["plain_topk"][k] for k in ("l0", "fvu", "explained_variance", "selection_rule")
        }
    if model_name:
        model = activations.load_model(model_name)
        context = int(cache.manifest["context"])
        n_ctx = max(1, -(-tokens // context))
        if dataset:
            cfg = CacheConfig(
                model=model_name,
                hooks=[hook],
                out="",
                corpus=dataset,
                tokens=n_ctx * context,
                context=context,
                seed=int(cache.manifest["seed"]),
            )
            token_ids = make_tokens(cfg, model.tokenizer, int(model.tokenizer.bos_token_id), n_ctx)
        else:
            token_ids = np.asarray(cache.tokens[:n_ctx])
        merge_in_the_loop(result, sae_in_the_loop(model, model_sae, hook, token_ids, zero_ablate_bos=zero_ablate_bos))
    return result


def merge_in_the_loop(metrics: dict, ce: dict) -> None:
    """Add sae_in_the_loop's CE/KL to a metrics dict; a g-SAE's plain-TopK numbers join its "plain_topk" block."""
    metrics.update({k: v for k, v in ce.items() if k != "plain_topk"})
    if "plain_topk" in ce:
        metrics.setdefault("plain_topk", {}).update(ce["plain_topk"])


def cache_eval_batches(
    cache, hook: str | None, n: int, with_grads: bool, step: int = 4096, start: int = 0
) -> list[Any]:
    """Rows [start, start + n) of a cache as evaluation batches: tensors, or (acts, grads) pairs for g-SAE."""
    x = cache.rows(start, start + n, hook=hook)
    if not with_grads:
        return [x[i : i + step] for i in range(0, n, step)]
    grads = cache.rows(start, start + n, hook=hook, kind="grads")
    return [(x[i : i + step], grads[i : i + step]) for i in range(0, n, step)]


def cache_metrics(model_sae, cache, hook: str | None, n: int, start: int = 0) -> tuple[dict, list[Any]]:
    """sae.evaluate on rows [start, start + n) of a cache, naming the inference rule used; also returns the
    activation batches it read (no gradients), so a caller scoring more modes does not read them again.

    A g-SAE on a cache with gradients is scored with its gradient rule, and also as plain TopK
    (under "plain_topk"); on a cache without gradients only plain TopK is possible, and it says so.
    """
    with_grads = bool(cache.has_grads and model_sae.needs_grads)
    batches = cache_eval_batches(cache, hook, n, with_grads, start=start)
    plain_batches = [x for x, _ in batches] if with_grads else batches
    metrics = sae_lib.evaluate(model_sae, batches)
    metrics["selection_rule"] = selection_rule(model_sae, with_grads)
    if with_grads:
        plain = sae_lib.evaluate(model_sae, plain_batches)
        metrics["plain_topk"] = {k: plain[k] for k in ("l0", "fvu", "explained_variance", "dead_frac", "dense_frac")}
        metrics["plain_topk"]["selection_rule"] = PLAIN_TOPK_RULE
    elif model_sae.needs_grads:
        metrics["selection_rule_note"] = (
            "the evaluation cache has no gradients, so this g-SAE was scored as plain TopK; "
            "use an eval cache made with `saewb cache --with-grads` for its gradient rule"
        )
    return metrics, plain_batches
