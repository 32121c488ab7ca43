"""Evaluation with the language model in the loop: CE clean / SAE-spliced / zero-ablated, CE recovered, KL.

Our choices (ALGORITHMS.md §7): the reconstruction is spliced at every non-BOS position (BOS is never
a training row, and replacing the attention sink would measure the sink, not the SAE); CE and KL are
averaged over positions whose next token is not BOS. For ``hook_z`` the whole [n_heads*d_head] row is
replaced and reshaped back, so zero-ablation zeroes every head at that layer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from activations.hooks import HookSpec


def _splice(hook_name: str, replace: Callable[[torch.Tensor], torch.Tensor], keep: torch.Tensor):
    """A forward hook that swaps the activation at non-BOS positions for ``replace(rows)``."""

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        shape = act.shape
        rows = act.reshape(shape[0], shape[1], -1)
        new = rows.clone()
        new[keep] = replace(rows[keep]).to(rows.dtype)
        return new.reshape(shape)

    return (hook_name, hook)


def ce_and_kl(logits: torch.Tensor, clean_logprobs: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """Summed next-token CE and summed KL(clean || new) over masked positions."""
    logprobs = logits[:, :-1].float().log_softmax(-1)
    nll = -logprobs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    kl = (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)
    return float((nll * mask).sum()), float((kl * mask).sum())


@torch.no_grad()
def model_in_the_loop(
    model,
    hook: HookSpec,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    tokens: np.ndarray,
    bos_id: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """CE of the clean model, with ``reconstruct`` spliced in, and with the hook zero-ablated."""
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0, "n": 0.0}
    for b0 in range(0, tokens.shape[0], batch_size):
        x = torch.from_numpy(np.asarray(tokens[b0 : b0 + batch_size]).astype(np.int64))
        keep = x != bos_id
        mask = (x[:, 1:] != bos_id).float()
        clean = model(x)
        clean_lp = clean[:, :-1].float().log_softmax(-1)
        ce_clean, _ = ce_and_kl(clean, clean_lp, x, mask)
        spliced = model.run_with_hooks(x, fwd_hooks=[_splice(hook.name, reconstruct, keep)])
        ce_sae, kl_sae = ce_and_kl(spliced, clean_lp, x, mask)
        zeroed = model.run_with_hooks(x, fwd_hooks=[_splice(hook.name, torch.zeros_like, keep)])
        ce_zero, kl_zero = ce_and_kl(zeroed, clean_lp, x, mask)
        for key, value in (
            ("clean", ce_clean),
            ("sae", ce_sae),
            ("zero", ce_zero),
            ("kl_sae", kl_sae),
            ("kl_zero", kl_zero),
            ("n", float(mask.sum())),
        ):
            totals[key] += value
    n = max(totals["n"], 1.0)
    ce_clean, ce_sae, ce_zero = totals["clean"] / n, totals["sae"] / n, totals["zero"] / n
    kl_sae, kl_zero = totals["kl_sae"] / n, totals["kl_zero"] / n
    return {
        "ce_loss_clean": ce_clean,
        "ce_loss_sae": ce_sae,
        "ce_loss_zero": ce_zero,
        "ce_loss_recovered": ce_loss_recovered(ce_clean, ce_sae, ce_zero),
        "delta_ce": ce_sae - ce_clean,
        "kl_div": kl_sae,
        "kl_div_zero": kl_zero,
        "kl_score": (kl_zero - kl_sae) / kl_zero if kl_zero > 0 else float("nan"),
        "ce_eval_tokens": int(totals["n"]),
    }


def sae_in_the_loop(model, sae_model, hook: str, token_ids: np.ndarray) -> dict[str, float]:
    """model_in_the_loop with an SAE's reconstruction, after checking it fits the model's hook."""
    from activations.hooks import resolve_hooks
    from sae.errors import SAEDataError

    spec = resolve_hooks(model, [hook])[0]
    if spec.d_in != sae_model.cfg.d_in:
        raise SAEDataError(
            f"the SAE has d_in={sae_model.cfg.d_in} but {model.cfg.model_name} has width {spec.d_in} at {hook}"
        )

    def reconstruct(rows: torch.Tensor) -> torch.Tensor:
        return sae_model(rows).to(rows.dtype)

    return model_in_the_loop(model, spec, reconstruct, token_ids, int(model.tokenizer.bos_token_id))


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
) -> dict:
    """The `saewb eval` report: reconstruction metrics on the cache, plus CE/KL when a model is given."""
    import activations
    import sae as sae_lib
    from activations.cache import CacheConfig, make_tokens
    from experiments.training import cache_eval_batches

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
    batches = cache_eval_batches(cache, hook, n, cache.has_grads and model_sae.needs_grads)
    metrics = sae_lib.evaluate(model_sae, batches)
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
        result.update(sae_in_the_loop(model, model_sae, hook, token_ids))
    return result
