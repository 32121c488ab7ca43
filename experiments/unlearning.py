"""Concept unlearning by clamping SAE features (after SAUCE; here on the language model), and what it costs.

1. The features most selective for the concept: mean activation on the concept text's tokens minus the mean on
   a fixed set of neutral contexts (experiments/steering.py's `neutral_contexts`), highest first.
2. For each clamp size n, the top n are clamped (to `clamp_value`, default 0) at every non-BOS position at the
   SAE's hook: x ← x + (value − z_f)·d_f for each clamped f, the steering page's clamp.
3. forgetting = the drop of the concept text's mean next-token log-probability (teacher-forced), nats;
   retention cost = KL(clamped ‖ clean) and the CE change on the neutral contexts, per position.
Clamping zero features changes nothing (KL = 0 exactly). The protocol is our choice (docs/ALGORITHMS.md §10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from experiments.steering import (
    SteeringError,
    feature_directions,
    hook_activations,
    prompt_tokens,
    steering_hook,
)

CLAMP_SIZES = (1, 2, 4, 8, 16)


@dataclass
class ClampPoint:
    n_features: int
    features: list[int]
    forgetting: float
    "Drop of the concept text's mean next-token log-probability (nats); > 0 means forgotten."
    kl: float
    "Mean KL(clamped || clean) per neutral position (nats)."
    delta_ce: float
    "Mean next-token CE change on the neutral contexts (nats)."


@torch.no_grad()
def selective_features(model, sae_model, hook: str, concept: torch.Tensor, neutral: torch.Tensor) -> torch.Tensor:
    """All latents, most concept-selective first: mean z on the concept's tokens minus mean z on neutral ones."""
    bos = int(model.tokenizer.bos_token_id)
    on_concept = sae_model.encode(hook_activations(model, hook, concept, sae_model.cfg.d_in)[1:]).mean(0)
    total, count = torch.zeros(sae_model.cfg.n_features), 0
    for row in neutral:
        z = sae_model.encode(hook_activations(model, hook, row[None], sae_model.cfg.d_in))[row != bos]
        total += z.sum(0)
        count += z.shape[0]
    return torch.argsort(on_concept - total / max(count, 1), descending=True, stable=True)


def _next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def unlearn_sweep(model, sae_model, hook: str, concept_text: str, neutral: torch.Tensor,
                  sizes: tuple[int, ...] = CLAMP_SIZES, clamp_value: float = 0.0) -> list[ClampPoint]:
    """Forgetting against retention cost for each clamp size (features ranked once, by selectivity)."""
    if any(n < 0 or n > sae_model.cfg.n_features for n in sizes):
        raise SteeringError(f"clamp sizes must be in 0..{sae_model.cfg.n_features}, got {list(sizes)}")
    concept = prompt_tokens(model, concept_text)
    if concept.shape[1] < 3:
        raise SteeringError("the concept text needs at least two tokens (its next-token log-probabilities are scored)")
    ranked = selective_features(model, sae_model, hook, concept, neutral).tolist()
    bos = int(model.tokenizer.bos_token_id)
    next_ok = (neutral[:, 1:] != bos).float()
    n_pos = float(next_ok.sum())
    clean_neutral = model(neutral)[:, :-1].float().log_softmax(-1)
    clean_concept = _next_token_logprobs(model(concept), concept).mean()
    points = []
    for n in sizes:
        features = ranked[:n]
        directions = feature_directions(sae_model, features) if features else None

        def run(tokens: torch.Tensor, features=features, directions=directions) -> torch.Tensor:
            if not features:
                return model(tokens)
            rows = torch.full((tokens.shape[0], len(features)), float(clamp_value))  # one row of values a sequence
            fn = steering_hook(sae_model, features, rows, directions, "clamp",
                               lambda seq_len: (tokens != bos).float())  # never a BOS, mid-context ones included
            return model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)])

        forgetting = float(clean_concept - _next_token_logprobs(run(concept), concept).mean())
        steered = run(neutral)[:, :-1].float().log_softmax(-1)
        kl = float(((steered.exp() * (steered - clean_neutral)).sum(-1) * next_ok).sum() / n_pos)
        target = neutral[:, 1:, None]
        delta_ce = float(((clean_neutral.gather(-1, target) - steered.gather(-1, target)).squeeze(-1)
                          * next_ok).sum() / n_pos)
        points.append(ClampPoint(n, features, forgetting, kl, delta_ce))
    return points
