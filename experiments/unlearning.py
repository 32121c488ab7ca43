"""Concept unlearning by clamping SAE features (after SAUCE; here on the language model), and what it costs.

1. The features most selective for the concept: mean activation on the concept text's tokens minus the mean on
   a fixed set of neutral contexts (experiments/steering.py's `neutral_contexts`), highest first.
2. For each clamp size n, the top n are clamped (to `clamp_value`, default 0) at every non-BOS position at the
   SAE's hook: x ← x + (value − z_f)·d_f for each clamped f, the steering page's clamp.
3. forgetting = the drop of the concept text's mean next-token log-probability (teacher-forced), nats;
   retention cost = KL(clamped ‖ clean) and the CE change on the neutral contexts, per position;
4. generation containment = the share of greedy continuations that contain a concept token, from the concept
   text's first half and the first tokens of the neutral contexts as prompts (clamped during generation too).
   Concept tokens are the concept text's tokens that are words (three or more letters) and occur in no neutral
   context, so "the" or "of" in a concept never count.
Clamping zero features changes nothing (KL = 0 exactly). The protocol is our choice (docs/ALGORITHMS.md §10).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from activations.devices import model_device
from experiments.steering import (
    SteeringError,
    feature_directions,
    generate_continuations,
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
    contained: float | None = None
    "Share of the greedy continuations holding a concept token (None: no generation, or no concept-only word)."


@torch.no_grad()
def selective_features(model, sae_model, hook: str, concept: torch.Tensor, neutral: torch.Tensor) -> torch.Tensor:
    """All latents, most concept-selective first: mean z on the concept's tokens minus mean z on neutral ones."""
    bos = int(model.tokenizer.bos_token_id)
    device = sae_model.W_enc.device
    on_concept = sae_model.encode(hook_activations(model, hook, concept, sae_model.cfg.d_in)[1:].to(device)).mean(0)
    total, count = torch.zeros(sae_model.cfg.n_features, device=device), 0
    for row in neutral:
        z = sae_model.encode(hook_activations(model, hook, row[None], sae_model.cfg.d_in).to(device))
        z = z[(row != bos).to(device)]
        total += z.sum(0)
        count += z.shape[0]
    return torch.argsort(on_concept - total / max(count, 1), descending=True, stable=True).cpu()


def concept_token_ids(model, concept: torch.Tensor, neutral: torch.Tensor) -> set[int]:
    """The concept text's tokens that are words of three or more letters and occur in no neutral context."""
    seen = set(neutral.flatten().tolist())
    words = set()
    for token in set(concept[0, 1:].tolist()):
        text = model.tokenizer.decode([token]).strip()
        if len(text) >= 3 and text.isalpha() and token not in seen:
            words.add(token)
    return words


def _not_bos(offset: list[int], seq_len: int) -> torch.Tensor:
    """The steering mask of generation: every fed position but the first (the BOS); offset[0] is where they start."""
    return ((offset[0] + torch.arange(seq_len)) > 0).float()


def generation_prompts(concept: torch.Tensor, neutral: torch.Tensor, n_neutral: int = 4, length: int = 8):
    """The prompts containment is measured on: the concept's first half, and the start of n neutral contexts."""
    half = max(2, (concept.shape[1] + 1) // 2)
    return [concept[:, :half], *(row[None, :length] for row in neutral[:n_neutral])]


@torch.no_grad()
def containment(model, sae_model, hook: str, features: list[int], clamp_value: float, prompts: list[torch.Tensor],
                concept_ids: set[int], new_tokens: int) -> float:
    """Share of the prompts whose greedy continuation of `new_tokens` tokens holds a concept token, with
    `features` clamped at every non-BOS position (prompt and generated tokens)."""
    hits = 0
    for prompt in prompts:
        offset = [0]
        hooks = []
        if features:
            values = torch.full((1, len(features)), float(clamp_value))
            fn = steering_hook(sae_model, features, values, feature_directions(sae_model, features), "clamp",
                               partial(_not_bos, offset))
            hooks = [(hook, fn)]
        new = generate_continuations(model, prompt, hooks, 1, new_tokens, 0.0, 1.0, 0, offset)[0]
        hits += any(t in concept_ids for t in new)
    return hits / len(prompts)


def _next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def unlearn_sweep(model, sae_model, hook: str, concept_text: str, neutral: torch.Tensor,
                  sizes: tuple[int, ...] = CLAMP_SIZES, clamp_value: float = 0.0,
                  generation_tokens: int = 16) -> list[ClampPoint]:
    """Forgetting against retention cost for each clamp size (features ranked once, by selectivity), and how often
    greedy generations still contain the concept (generation_tokens new tokens per prompt; 0: not measured)."""
    if any(n < 0 or n > sae_model.cfg.n_features for n in sizes):
        raise SteeringError(f"clamp sizes must be in 0..{sae_model.cfg.n_features}, got {list(sizes)}")
    concept = prompt_tokens(model, concept_text).to(model_device(model))
    neutral = neutral.to(concept.device)  # the masks and targets meet the model's logits there
    if concept.shape[1] < 3:
        raise SteeringError("the concept text needs at least two tokens (its next-token log-probabilities are scored)")
    ranked = selective_features(model, sae_model, hook, concept, neutral).tolist()
    concept_ids = concept_token_ids(model, concept, neutral)
    prompts = generation_prompts(concept, neutral)
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
        contained = None
        if generation_tokens > 0 and concept_ids:
            contained = containment(model, sae_model, hook, features, clamp_value, prompts, concept_ids,
                                    generation_tokens)
        points.append(ClampPoint(n, features, forgetting, kl, delta_ce, contained))
    return points
