"""Steering: add SAE feature directions at a hook while sampling, baseline and steered from the same seed.

A feature's direction is decode(c * e_f) - decode(0): what the SAE's reconstruction moves by when that
feature's activation moves by c, in the model's own activation space (normalisation included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import streamlit as st
import torch

from dashboard.data import get_store, model_and_sae, pick_sae
from dashboard.prompt_inspector import InputError, hook_activations, prompt_tokens

MAX_RAW = 1000.0
MAX_TIMES_MAX_ACT = 100.0
POSITIONS = ("all", "prompt", "generated")
MODES = ("add", "clamp", "ablate")


class SteeringError(InputError):
    """A steering request the page reports as a message (bad coefficients, features, settings)."""


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
    z = torch.zeros(len(features) + 1, sae_model.cfg.n_features)
    z[torch.arange(1, len(features) + 1), torch.tensor(features)] = 1.0
    y = sae_model.decode(z)
    return y[1:] - y[:1]


def steering_hook(sae_model, features: list[int], values: torch.Tensor, directions: torch.Tensor, mode: str,
                  mask_of):
    """A transformer_lens hook over a batch of R sequences, row r steered with values[r] ([R, n]; NaN: untouched).

    `add` adds value * direction; `clamp`/`ablate` move each feature's activation to value / 0, as
    x + (value - z_f) * direction, at the positions `mask_of(seq_len)` selects.
    """
    feats = torch.tensor(features)
    active = (~values.isnan().any(1)).float()  # [R]
    vals = values.nan_to_num(0.0)
    if mode == "ablate":
        vals = torch.zeros_like(vals)

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        shape = act.shape
        x = act.reshape(shape[0], shape[1], -1).float()
        mask = mask_of(shape[1]).to(x.device)
        if mode == "add":
            delta = (vals @ directions)[:, None, :]  # [R, 1, d]
        else:
            z = sae_model.encode(x)[..., feats]  # [R, T, n]
            delta = (vals[:, None, :] - z) @ directions
        x = x + delta * mask[None, :, None] * active[:, None, None]
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
def _generate(model, tokens: torch.Tensor, hooks, n_rows: int, max_new_tokens: int, temperature: float,
              top_p: float, seed: int, offset: list[int], on_token=None) -> list[list[int]]:
    """Sample `n_rows` continuations in one batch with a KV cache (on CPU a step's cost is mostly per call);
    each row has its own generator with the same seed, so rows differ only by their steering.
    `offset[0]` tells the steering hook the absolute position of the tokens fed at each step; `on_token(i, n)`
    is called after each of the n steps (the page's progress bar: generation is slow on a CPU)."""
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
        logits = model.run_with_hooks(feed, fwd_hooks=hooks, past_kv_cache=kv)[:, -1].float()
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
    texts = [model.tokenizer.decode(ids) for ids in
             _generate(model, tokens, hooks, rows.shape[0], max_new_tokens, temperature, top_p, seed, offset,
                       on_token)]
    return SteeringResult(texts[0], texts[1:])


def render() -> None:
    st.title("Steering")
    store = get_store()
    if store is None:
        return
    name = pick_sae(store)
    info = store.sae(name)
    prompt = st.text_area("Prompt", value="The weather today is", key="steer_prompt")
    left, right = st.columns(2)
    features_text = left.text_input("Features (comma-separated ids)", value="0", key="steer_features")
    coefs_text = right.text_input("Coefficients (one per feature, or one for all)", value="4", key="steer_coefs")
    scale = left.radio("Coefficient unit", ["raw", "× max activation"], horizontal=True, key="steer_scale")
    mode = right.radio("Intervention", list(MODES), horizontal=True, key="steer_mode")
    positions = left.radio("Positions", list(POSITIONS), horizontal=True, key="steer_positions")
    seed = right.number_input("Seed", value=0, step=1, key="steer_seed")
    max_new = left.number_input("New tokens", value=12, min_value=1, max_value=200, key="steer_new")
    temperature = right.slider("Temperature", 0.0, 2.0, 0.0, 0.05, key="steer_temp")
    top_p = left.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="steer_top_p")
    sweep_text = right.text_input("Coefficient sweep for the first feature (optional)", value="", key="steer_sweep")
    if not st.button("Generate", key="steer_go"):
        return
    try:
        features = parse_features(features_text, info["n_features"])
        max_acts = [store.feature(name, f)["max_act"] for f in features]
        values = parse_coefficients(coefs_text, len(features), scale, max_acts) if mode != "ablate" else \
            [0.0] * len(features)
        n_sweep = len([p for p in sweep_text.split(",") if p.strip()])
        sweep = parse_coefficients(sweep_text, n_sweep, scale, max_acts[:1] * n_sweep) if n_sweep else []
    except (SteeringError, ValueError) as exc:
        st.error(str(exc))
        return
    loaded = model_and_sae(store, name)
    if loaded is None:
        return
    model, sae_model, hook = loaded
    settings = dict(positions=positions, mode=mode, max_new_tokens=int(max_new), temperature=float(temperature),
                    top_p=float(top_p), seed=int(seed))
    sweep_rows = [[c, *values[1:]] for c in sweep]
    bar = st.progress(0.0, text="generating ...")

    def on_token(step: int, total: int) -> None:
        bar.progress(step / total, text=f"generating token {step + 1} of {total} ({len(sweep_rows) + 2} rows)")

    try:
        result = steer_generate(model, sae_model, hook, features, [values, *sweep_rows], prompt, **settings,
                                on_token=on_token)
    except InputError as exc:
        bar.empty()
        st.error(str(exc))
        return
    bar.empty()
    rows = [{"coefficient": c, "steered": text} for c, text in zip(sweep, result.steered[1:], strict=True)]
    a, b = st.columns(2)
    a.markdown("**Baseline**")
    a.code(prompt + result.baseline, language=None, wrap_lines=True)
    b.markdown(f"**Steered** ({mode}, features {features}, values {[round(v, 3) for v in values]})")
    b.code(prompt + result.steered[0], language=None, wrap_lines=True)
    if rows:
        st.markdown(f"**Sweep over feature {features[0]}** ({mode}, same seed, other features as above)")
        st.dataframe(rows, hide_index=True, width="stretch")
