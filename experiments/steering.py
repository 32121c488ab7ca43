"""Steering with SAE features, and scoring it: the maths behind `saewb steer` and the dashboard's Steering page.

A feature's direction is decode(c * e_f) - decode(0): what the SAE's reconstruction moves by when that
feature's activation moves by c, in the model's own activation space (normalisation included).

Scoring (docs/ALGORITHMS.md §10; the protocol is our choice): for each coefficient c, c * direction is added at
every non-BOS position of a fixed set of neutral contexts (teacher-forced), and
- effect = the mean change in log-probability of the feature's top logit-lens tokens (W_U d_f), over positions
  and tokens: how much the intervention does what the feature "says";
- kl = KL(steered || clean) and delta_ce = CE(steered) - CE(clean) of the next tokens, per position: what it costs;
- text = the steered greedy continuation of a prompt.
Coefficient 0 costs nothing and does nothing, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from activations.cache import CacheConfig, make_tokens
from activations.devices import model_device

MAX_RAW = 1000.0
MAX_TIMES_MAX_ACT = 100.0
POSITIONS = ("all", "prompt", "generated")
MODES = ("add", "clamp", "ablate")
N_TARGET_TOKENS = 10
"""Top logit-lens tokens of a feature whose log-probability the effect measures."""


class InputError(ValueError):
    """Input reported as one message (a page message, or one line and exit 2 from saewb): empty text, an SAE
    that does not fit the model's hook, bad features or coefficients."""


class SteeringError(InputError):
    """A steering request that cannot run (bad coefficients, features, settings)."""


def prompt_tokens(model, text: str) -> torch.Tensor:
    """[1, T] token ids of `text` after the model's BOS, as the cache's contexts start."""
    if not text.strip():
        raise InputError("the text is empty: type something to inspect")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[model.tokenizer.bos_token_id, *ids]])


@torch.no_grad()
def hook_activations(model, hook: str, tokens: torch.Tensor, d_in: int) -> torch.Tensor:
    """[T, d] activations at `hook` (BOS included); an InputError when the width is not the SAE's d_in."""
    if hook not in model.hook_dict:
        raise InputError(f"the model has no hook {hook!r}")
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    acts = cache[hook][0].reshape(tokens.shape[1], -1).float()
    if acts.shape[1] != d_in:
        raise InputError(f"the SAE has d_in={d_in} but the model's {hook} has width {acts.shape[1]}")
    return acts


def parse_features(text: str, n_features: int) -> list[int]:
    """Comma-separated feature ids, each within 0..n_features-1."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise SteeringError("give at least one feature id, e.g. 12, 40")
    out = []
    for part in parts:
        try:
            idx = int(part)
        except ValueError as exc:
            raise SteeringError(f"feature id {part!r} is not an integer") from exc
        if not 0 <= idx < n_features:
            raise SteeringError(f"feature {idx} is out of range: this SAE has features 0..{n_features - 1}")
        out.append(idx)
    return out


def parse_coefficients(text: str, n: int, scale: str, max_acts: list[float]) -> list[float]:
    """Activation values per feature: raw (|c| <= 1000) or multiples of each feature's max activation (<= 100)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and n > 1:
        parts = parts * n
    if len(parts) != n:
        raise SteeringError(f"give one coefficient per feature ({n}), or one for all; got {len(parts)}")
    bound = MAX_RAW if scale == "raw" else MAX_TIMES_MAX_ACT
    out = []
    for part, max_act in zip(parts, max_acts, strict=True):
        try:
            c = float(part)
        except ValueError as exc:
            raise SteeringError(f"coefficient {part!r} is not a number") from exc
        if not math.isfinite(c):
            raise SteeringError(f"coefficient {part!r} is not finite")
        if abs(c) > bound:
            unit = "" if scale == "raw" else " × max activation"
            raise SteeringError(f"coefficient {c:g}{unit} is too large: keep |c| <= {bound:g}")
        out.append(c if scale == "raw" else c * max_act)
    return out


@torch.no_grad()
def feature_directions(sae_model, features: list[int]) -> torch.Tensor:
    """[n, d] change of the reconstruction per unit of each feature's activation."""
    if sae_model.cfg.normalization == "per_token_standardize":
        raise SteeringError("steering needs an SAE with scalar or no normalisation (this one standardises per token)")
    z = torch.zeros(len(features) + 1, sae_model.cfg.n_features, device=sae_model.W_dec.device)
    z[torch.arange(1, len(features) + 1), torch.tensor(features)] = 1.0
    y = sae_model.decode(z)
    return y[1:] - y[:1]


def steering_hook(sae_model, features: list[int], values: torch.Tensor, directions: torch.Tensor, mode: str,
                  mask_of):
    """A transformer_lens hook over a batch of R sequences, row r steered with values[r] ([R, n]; NaN: untouched).

    `add` adds value * direction; `clamp`/`ablate` move each feature's activation to value / 0, as
    x + (value - z_f) * direction, at the positions `mask_of(seq_len)` selects.
    """
    feats = torch.tensor(features, device=directions.device)
    values = values.to(directions.device)
    active = (~values.isnan().any(1)).float()  # [R]
    vals = values.nan_to_num(0.0)
    if mode == "ablate":
        vals = torch.zeros_like(vals)

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        shape = act.shape
        x = act.reshape(shape[0], shape[1], -1).float().to(directions.device)  # the SAE's (as a rule, the model's)
        mask = mask_of(shape[1]).to(x.device)  # [T], or [R, T] when positions differ per sequence
        mask = mask if mask.dim() == 2 else mask[None, :]
        if mode == "add":
            delta = (vals @ directions)[:, None, :]  # [R, 1, d]
        else:
            z = sae_model.encode(x)[..., feats]  # [R, T, n]
            delta = (vals[:, None, :] - z) @ directions
        x = (x + delta * mask[:, :, None] * active[:, None, None]).to(act.device)
        return x.to(act.dtype).reshape(shape)

    return hook


@dataclass
class SteeringResult:
    baseline: str
    steered: list[str]  # one per row of values, in order


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    sorted_probs = probs[order]
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest prefix whose mass reaches top_p
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])


@torch.no_grad()
def generate_continuations(model, tokens: torch.Tensor, hooks, n_rows: int, max_new_tokens: int, temperature: float,
                           top_p: float, seed: int, offset: list[int], on_token=None) -> list[list[int]]:
    """Sample `n_rows` continuations in one batch with a KV cache (on CPU a step's cost is mostly per call);
    each row has its own generator with the same seed, so rows differ only by their steering.
    `offset[0]` tells the steering hook the absolute position of the tokens fed at each step; `on_token(i, n)`
    is called after each of the n steps (the page's progress bar: generation is slow on a CPU)."""
    if hasattr(model, "new_kv_cache"):  # the hf backend (activations/hf_backend.py)
        kv = model.new_kv_cache(n_rows)
    else:
        # deferred: transformer_lens costs ~6 s to import, paid only when a model is loaded (docs/ARCHITECTURE.md)
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, n_rows)
    generators = [torch.Generator().manual_seed(seed) for _ in range(n_rows)]
    feed = tokens.expand(n_rows, -1)
    offset[0] = 0
    eos = model.tokenizer.eos_token_id
    done = [False] * n_rows
    new: list[list[int]] = [[] for _ in range(n_rows)]
    for step in range(max_new_tokens):
        if on_token is not None:
            on_token(step, max_new_tokens)
        # on the host: the rows sample with CPU generators (one [R, vocab] copy a token; its sync is the token read)
        logits = model.run_with_hooks(feed, fwd_hooks=hooks, past_kv_cache=kv)[:, -1].float().cpu()
        offset[0] += feed.shape[1]
        nxt = [eos if done[r] else _sample(logits[r], temperature, top_p, generators[r]) for r in range(n_rows)]
        for r, token in enumerate(nxt):
            if not done[r]:
                new[r].append(token)
        done = [d or t == eos for d, t in zip(done, nxt, strict=True)]
        if all(done):
            break
        feed = torch.tensor(nxt)[:, None]
    return new


def steer_generate(model, sae_model, hook: str, features: list[int], values: list[list[float]], prompt: str,
                   positions: str = "all", mode: str = "add", max_new_tokens: int = 12, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, on_token=None) -> SteeringResult:
    """The baseline and one steered continuation of `prompt` per row of `values`, all from the same seed."""
    if positions not in POSITIONS or mode not in MODES:
        raise SteeringError(f"positions must be one of {POSITIONS} and mode one of {MODES}")
    if not 0 < max_new_tokens <= 200 or not 0 <= temperature <= 5 or not 0 < top_p <= 1:
        raise SteeringError("keep 1 <= new tokens <= 200, 0 <= temperature <= 5 and 0 < top-p <= 1")
    if hook not in model.hook_dict:
        raise SteeringError(f"the model has no hook {hook!r}")
    tokens = prompt_tokens(model, prompt)
    hook_activations(model, hook, tokens, sae_model.cfg.d_in)  # a width mismatch is a message, not a shape error
    n_prompt = tokens.shape[1]

    offset = [0]

    def mask_of(seq_len: int) -> torch.Tensor:
        pos = offset[0] + torch.arange(seq_len)
        keep = pos > 0  # never the BOS: the SAE never saw it
        if positions == "prompt":
            keep &= pos < n_prompt
        elif positions == "generated":
            keep &= pos >= n_prompt
        return keep.float()

    directions = feature_directions(sae_model, features)
    rows = torch.tensor([[float("nan")] * len(features), *values], dtype=torch.float32)  # row 0: the baseline
    hooks = [(hook, steering_hook(sae_model, features, rows, directions, mode, mask_of))]
    rows_out = generate_continuations(model, tokens, hooks, rows.shape[0], max_new_tokens, temperature, top_p, seed,
                                      offset, on_token)
    texts = [model.tokenizer.decode(ids) for ids in rows_out]
    return SteeringResult(texts[0], texts[1:])


def neutral_contexts(model, n_contexts: int = 8, context: int = 64, corpus: str = "default", seed: int = 12345):
    """[n, context] token ids of a fixed, seeded corpus sample: the "arbitrary contexts" steering is scored on."""
    cfg = CacheConfig(model="", hooks=[], out="", corpus=corpus, tokens=n_contexts * context, context=context,
                      seed=seed)
    return torch.from_numpy(np.asarray(make_tokens(cfg, model.tokenizer, int(model.tokenizer.bos_token_id),
                                                   n_contexts)).astype(np.int64))


@torch.no_grad()
def target_tokens(model, direction: torch.Tensor, hook: str, n: int = N_TARGET_TOKENS) -> torch.Tensor:
    """The n tokens whose logits the direction raises most directly (W_U d; through W_O for hook_z)."""
    if hook.endswith("hook_z"):
        layer = int(hook.split(".")[1])
        w_o = model.blocks[layer].attn.W_O.detach().float()  # [heads, d_head, d_model]
        direction = torch.einsum("hd,hdm->m", direction.to(w_o.device).reshape(w_o.shape[0], w_o.shape[1]), w_o)
    w_u = model.W_U.detach().float()
    return (direction.to(w_u.device) @ w_u).topk(n).indices


@dataclass
class SweepPoint:
    coefficient: float
    effect: float
    "Mean change of log p(target tokens) over neutral positions (nats)."
    kl: float
    "Mean KL(steered || clean) per neutral position (nats)."
    delta_ce: float
    "Mean next-token CE change on the neutral contexts (nats)."
    text: str
    "The steered greedy continuation of the prompt."


@torch.no_grad()
def score_sweep(model, sae_model, hook: str, features: list[int], coefficients: list[float], prompt: str,
                neutral: torch.Tensor, max_new_tokens: int = 12, on_step=None) -> list[SweepPoint]:
    """Effect, cost and steered text of adding coefficient * direction of each feature (all features alike)."""
    if not coefficients:
        raise SteeringError("give at least one coefficient")
    for c in coefficients:
        if not math.isfinite(c) or abs(c) > MAX_RAW:
            raise SteeringError(f"coefficient {c!r} must be a finite number with |c| <= {MAX_RAW:g}")
    if hook not in model.hook_dict:
        raise SteeringError(f"the model has no hook {hook!r}")
    bos = int(model.tokenizer.bos_token_id)
    hook_activations(model, hook, neutral[:1], sae_model.cfg.d_in)  # a width mismatch is one message
    neutral = neutral.to(model_device(model))  # the masks and targets meet the model's logits there
    directions = feature_directions(sae_model, features)
    targets = torch.unique(torch.cat([target_tokens(model, d, hook) for d in directions]))
    keep = (neutral != bos).float()  # steer every non-BOS position
    next_ok = (neutral[:, 1:] != bos).float()  # score predictions of real next tokens
    clean = model(neutral)[:, :-1].float().log_softmax(-1)
    n_pos = float(next_ok.sum())
    points = []
    for i, c in enumerate(coefficients):
        if on_step is not None:
            on_step(i, len(coefficients) + 1)
        delta = (torch.full((len(features),), float(c), device=directions.device) @ directions).float()
        delta = delta.to(neutral.device)

        def add(act: torch.Tensor, hook, delta: torch.Tensor = delta) -> torch.Tensor:
            shape = act.shape
            x = act.reshape(shape[0], shape[1], -1).float() + keep[:, :, None] * delta
            return x.to(act.dtype).reshape(shape)

        steered = model.run_with_hooks(neutral, fwd_hooks=[(hook, add)])[:, :-1].float().log_softmax(-1)
        effect = ((steered - clean)[..., targets].mean(-1) * next_ok).sum() / n_pos
        kl = ((steered.exp() * (steered - clean)).sum(-1) * next_ok).sum() / n_pos
        target = neutral[:, 1:].unsqueeze(-1)
        delta_ce = ((clean.gather(-1, target) - steered.gather(-1, target)).squeeze(-1) * next_ok).sum() / n_pos
        points.append(SweepPoint(float(c), float(effect), float(kl), float(delta_ce), ""))
    if on_step is not None:
        on_step(len(coefficients), len(coefficients) + 1)
    texts = steer_generate(model, sae_model, hook, features, [[c] * len(features) for c in coefficients], prompt,
                           max_new_tokens=max_new_tokens).steered
    for point, text in zip(points, texts, strict=True):
        point.text = text
    return points
