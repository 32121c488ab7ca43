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

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import activations
import sae as sae_lib
from activations.cache import CacheConfig, make_tokens, next_token_ce_sum
from activations.devices import model_device
from activations.hooks import HookSpec, resolve_hooks
from sae.devices import resolve_device
from sae.errors import SAEDataError

Reconstruct = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""rows [n, d] at the spliced positions (and the clean loss gradient there, or None) -> replacement rows."""
GRADIENT_RULE, PLAIN_TOPK_RULE = "gradient selection", "plain TopK at inference"


def selection_rule(sae_model, with_grads: bool) -> str:
    """The inference rule an evaluation of this SAE uses, as reports print it."""
    if sae_model.needs_grads:
        return GRADIENT_RULE if with_grads else PLAIN_TOPK_RULE
    return "thresholds (JumpReLU)" if sae_model.calibration_rule else "TopK"


def _zeros(rows: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(rows)


def clean_reference(clean_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean run's next-token probabilities and their Σ p·log p per position, computed once per batch and
    shared by every splice's KL (which then costs one log-softmax and one contraction)."""
    logprobs = clean_logits[:, :-1].float().log_softmax(-1)
    probs = logprobs.exp()
    return probs, torch.einsum("bpv,bpv->bp", probs, logprobs)


def ce_and_kl(logits: torch.Tensor, clean: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor,
              mask: torch.Tensor) -> tuple[float, float]:
    """Summed next-token CE and summed KL(clean || new) over masked positions; clean from clean_reference."""
    probs, neg_entropy = clean
    logprobs = logits[:, :-1].float().log_softmax(-1)
    nll = -logprobs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    kl = neg_entropy - torch.einsum("bpv,bpv->bp", probs, logprobs)
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


_RESIDUAL_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)$")


def restart_layer(model, hook_name: str) -> int | None:
    """The block a forward can restart at with the activation at this hook as its residual stream, or None.

    For ``blocks.L.hook_resid_post`` (L+1) and ``blocks.L.hook_resid_pre`` (L) of a transformer_lens model the
    prefix up to the hook is the same for the clean run and every splice, so it is computed once per batch and
    each splice runs only the blocks after it (``start_at_layer``).
    """
    match = _RESIDUAL_HOOK.match(hook_name)
    if match is None or not hasattr(model, "blocks"):
        return None
    return int(match.group(1)) + (match.group(2) == "post")


def _replaced(rows: torch.Tensor, replace: Reconstruct, keep: torch.Tensor, grads: torch.Tensor | None):
    """rows [batch, pos, ...] with the ``keep`` positions swapped for ``replace(rows, grads)``."""
    shape = rows.shape
    flat = rows.reshape(shape[0], shape[1], -1)
    new = flat.clone()
    g = None if grads is None else grads.reshape(shape[0], shape[1], -1)[keep]
    new[keep] = replace(flat[keep], g).to(flat.dtype)
    return new.reshape(shape)


def _spliced_logits(model, hook_name: str, split: int | None, inputs: torch.Tensor, replace: Reconstruct,
                    at: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    """Logits with the activation at the ``at`` positions replaced: from the shared residual ``inputs`` (split)
    or by a hook on a full forward of the tokens ``inputs``."""
    if split is not None:
        return model(_replaced(inputs, replace, at, grads), start_at_layer=split)
    return model.run_with_hooks(inputs, fwd_hooks=[(hook_name, lambda act, hook: _replaced(act, replace, at, grads))])


@torch.no_grad()
def in_the_loop_reports(
    model,
    hook: HookSpec,
    named: dict[str, Reconstruct],
    tokens: np.ndarray,
    bos_id: int,
    batch_size: int = 16,
    with_grads: bool = False,
    zero_ablate_bos: bool = False,
    progress: bool = False,
) -> dict[str, dict]:
    """CE of the clean model, with each named reconstruction spliced in, and with the hook zero-ablated.

    The clean and zero-ablated runs (and, at a residual-stream hook, the forward up to the hook) are shared by
    every reconstruction, so scoring many SAEs on the same tokens costs one splice forward each. named: functions
    of (rows, clean gradient or None). with_grads: compute the clean loss gradient at the hook (one backward per
    batch, through the whole model) and pass it. Returns one report per name.
    """
    totals = {"clean": 0.0, "zero": 0.0, "kl_zero": 0.0, "n": 0.0}
    totals.update({f"{key}_{name}": 0.0 for name in named for key in ("ce", "kl")})
    split = None if with_grads else restart_layer(model, hook.name)
    device = model_device(model)  # the tokens go where the model is
    starts = range(0, tokens.shape[0], batch_size)
    for b0 in tqdm(starts, desc="CE/KL", unit="batch", disable=not progress or len(starts) < 2):
        x = torch.from_numpy(np.asarray(tokens[b0 : b0 + batch_size]).astype(np.int64)).to(device)
        keep = x != bos_id
        mask = (x[:, 1:] != bos_id).float()
        grads, inputs = None, x
        if with_grads:
            clean, grads = clean_logits_and_hook_grads(model, hook.name, x, bos_id)
        elif split is None:
            clean = model(x)
        else:
            inputs = model(x, stop_at_layer=split)  # the residual stream at the hook, shared by every splice
            clean = model(inputs, start_at_layer=split)
        spliced = partial(_spliced_logits, model, hook.name, split, inputs)
        clean_lp = clean_reference(clean)
        totals["clean"] += ce_and_kl(clean, clean_lp, x, mask)[0]
        for name, fn in named.items():
            ce, kl = ce_and_kl(spliced(fn, keep, grads), clean_lp, x, mask)
            totals[f"ce_{name}"] += ce
            totals[f"kl_{name}"] += kl
        ce_zero, kl_zero = ce_and_kl(spliced(_zeros, torch.ones_like(keep) if zero_ablate_bos else keep, None),
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
            "ce_contexts": int(tokens.shape[0]),
            "zero_ablate_bos": zero_ablate_bos,
        }
    return reports


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
    """in_the_loop_reports for one function of the rows, or named functions of (rows, gradient or None):
    the metrics of the first (or only) reconstruction, with the others under their names."""
    named = reconstruct if isinstance(reconstruct, dict) else {"sae": lambda rows, g: reconstruct(rows)}
    reports = in_the_loop_reports(model, hook, named, tokens, bos_id, batch_size, with_grads, zero_ablate_bos)
    first, *others = named
    return {**reports[first], **{name: reports[name] for name in others}}


def check_fits(model, saes, hook: str) -> HookSpec:
    """The model's hook spec (one probe forward), after checking every SAE's width matches it."""
    spec = resolve_hooks(model, [hook])[0]
    for sae_model in saes:
        if spec.d_in != sae_model.cfg.d_in:
            raise SAEDataError(
                f"the SAE has d_in={sae_model.cfg.d_in} but {model.cfg.model_name} has width {spec.d_in} at {hook}"
            )
    return spec


def saes_in_the_loop(model, saes: dict[str, Any], hook: str, token_ids: np.ndarray, zero_ablate_bos: bool = False,
                     progress: bool = False) -> dict[str, dict]:
    """CE/KL of several SAEs at one hook on the same tokens, sharing the clean and zero-ablated runs.

    A gradient SAE is scored with its gradient rule (main keys) and as plain TopK (under "plain_topk"); the
    clean loss gradient is computed when any SAE needs it. Returns one sae_in_the_loop result per name.
    """
    spec = check_fits(model, saes.values(), hook)

    def with_rule(sae_model, use_grads: bool) -> Reconstruct:
        return lambda rows, g: sae_model(rows, g.to(rows.dtype) if use_grads else None).to(rows.dtype)

    named = {}
    for name, s in saes.items():
        named[name] = with_rule(s, s.needs_grads)
        if s.needs_grads:
            named[f"{name} / {PLAIN_TOPK_RULE}"] = with_rule(s, False)
    with_grads = any(s.needs_grads for s in saes.values())
    reports = in_the_loop_reports(model, spec, named, token_ids, int(model.tokenizer.bos_token_id),
                                  with_grads=with_grads, zero_ablate_bos=zero_ablate_bos, progress=progress)
    results = {}
    for name, s in saes.items():
        results[name] = {**reports[name], "ce_selection_rule": selection_rule(s, s.needs_grads)}
        if s.needs_grads:
            plain = reports[f"{name} / {PLAIN_TOPK_RULE}"]
            results[name]["plain_topk"] = {**plain, "ce_selection_rule": PLAIN_TOPK_RULE}
    return results


def sae_in_the_loop(model, sae_model, hook: str, token_ids: np.ndarray, zero_ablate_bos: bool = False) -> dict:
    """CE/KL with an SAE's reconstruction spliced in, after checking it fits the model's hook.

    A gradient SAE is scored with its gradient rule (main keys) and as plain TopK (under "plain_topk").
    """
    return saes_in_the_loop(model, {"sae": sae_model}, hook, token_ids, zero_ablate_bos)["sae"]


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
    device: str = "auto",
) -> dict:
    """The `saewb eval` report: reconstruction metrics on the cache, plus CE/KL when a model is given; the SAE and
    the model on `device` (auto: CUDA when available)."""
    target = resolve_device(device)  # a bad device is one error before anything is read
    model_sae = sae_lib.load(sae_dir, device=str(target))
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
        model = activations.load_model(model_name, device=str(target), backend=activations.backend_of_hook(hook))
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
