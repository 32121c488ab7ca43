"""The IOI evaluation of an SAE against supervised dictionaries (after Makelov, Lange & Nanda 2024; docs/ALGORITHMS.md
§9): the maths behind `saewb ioi`.

1. Prompts. Indirect-object-identification prompts in ABBA and BABA order over several templates ("When Mary and
   John went to the store, John gave a drink to" -> " Mary"), with names that are single tokens with a leading
   space in the model's own tokenizer. Each prompt has three attributes, its IO name, its S name and its order
   (`pos`: ABBA, IO first, or BABA), and one counterfactual per attribute that changes that attribute only.
   IO, S, order and template are balanced over the prompts; everything is deterministic in the seed.
2. The node: the SAE's hook at one position, the second S token (`s2`, default) or the last token (`end`). Why s2:
   at blocks.6.hook_resid_post of SmolLM2-135M (200 prompts, seed 0), mean-ablating the last position moves the
   logit diff from 3.16 to 3.15 (the names reach the last position in later layers), while mean-ablating s2 takes
   it to -0.18: at that depth the information the task needs sits at s2, so only there are the fractions below
   informative. (Our choice; the paper's nodes are attention-head outputs of the IOI circuit at their positions.)
3. Metric: LD = logit(IO) - logit(S) at the last position.
4. Supervised dictionary (the paper's mean codes): x ~ mean + u_IO[io] + u_S[s] + u_pos[order], with
   u_a[v] = E[x | a = v] - E[x] over the prompts' node activations (float64). An SAE's reconstruction is sae(x).
5. With LD_clean and LD_mean (the node mean-ablated to E[x]), both averaged over prompts:
   sufficiency = (LD(x -> x_hat) - LD_mean) / (LD_clean - LD_mean)      (1: x_hat is all the model needs)
   necessity   = (LD_clean - LD(x -> x - x_hat + E[x_hat])) / (LD_clean - LD_mean)   (ablate x_hat, keep the error)
   control, per attribute a changed from v to w: the supervised edit x - u_a[v] + u_a[w]; the SAE edit changes at
   most n latents (the n highest-F1 candidates of: latents active in the prompt, scored by F1 for v, set to 0; and
   latents scored by F1 for w, set to their mean activation over the prompts with a = w; equal F1s alternate
   removing and adding), keeping the SAE's error x - sae(x). Score, with M = logit(IO') - logit(S') of the
   counterfactual's names: (M_edit - M_clean) / (M_target - M_clean), the target being the counterfactual prompt's
   own M ("prompt"), or the clean prompt with the counterfactual's real node activation patched in ("patch": the
   most any edit of this node can do). The tokens before the node are run once per batch (a frozen KV cache).
   F1: latent f "detects" value v when it is active (> 0); F1 = 2 TP / (#active + #prompts with v).
   A ratio whose denominator is under MIN_EFFECT x |LD_clean| is reported as None: nothing to normalise by.
   Ratios are of means over prompts; the dictionary, the F1 table and the edits use the same prompts (our choices).
   FVU here is over the prompts' node activations, about their mean (not eval.json's FVU over corpus tokens).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from experiments.steering import InputError

NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Alice", "Bob", "Mike", "Sarah", "Emma", "Kate",
    "Paul", "Mark", "Lisa", "Anna", "David", "Chris", "Jane", "Laura", "Peter", "Susan", "Kevin", "Rose", "Adam",
    "Ben", "Jack", "Sam", "Lucy", "Mia", "Max", "Leo", "Anne", "Helen", "George", "Henry", "Joe", "Tim", "Steve",
    "Eric", "Ryan", "Karen", "Linda", "Nancy", "Grace", "Eve", "Carl", "Roy",
)
"""Common first names; those that are one token with a leading space in the model's tokenizer are used."""
TEMPLATES = (
    "When {0} and {1} went to the store, {2} gave a drink to",
    "Then, {0} and {1} went to the park. {2} gave a ball to",
    "After {0} and {1} went to the school, {2} gave a book to",
    "While {0} and {1} were working at the office, {2} gave a pen to",
    "Friends {0} and {1} went to the house. {2} gave a key to",
    "When {0} and {1} got a letter at the station, {2} decided to give it to",
)
"""{0}, {1}: the first two names (IO, S in ABBA order; S, IO in BABA); {2}: the second S; the answer is " IO"."""
ATTRIBUTES = ("io", "s", "pos")
ORDERS = ("ABBA", "BABA")
POSITIONS = ("s2", "end")
N_LATENTS = (1, 2, 4, 8)
N_NAMES = 16
MIN_NAMES = 4
MIN_EFFECT = 0.05
"""A normalising difference under this fraction of |LD_clean| makes a ratio None (our choice)."""


class IOIError(InputError):
    """An IOI request that cannot run: bad counts, an SAE that does not fit the model, a tokenizer without names."""


# ---- prompts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IOIPrompt:
    template: int
    io: int
    "Index of the IO name in the name list."
    s: int
    order: int
    "0: ABBA (IO named first), 1: BABA."

    def names(self) -> tuple[int, int, int]:
        """Name indices in the template's slots {0}, {1}, {2}."""
        return (self.io, self.s, self.s) if self.order == 0 else (self.s, self.io, self.s)

    def text(self, names: list[str]) -> str:
        return TEMPLATES[self.template].format(*(names[i] for i in self.names()))

    def label(self, attribute: str) -> int:
        return {"io": self.io, "s": self.s, "pos": self.order}[attribute]


def single_token_names(tokenizer, candidates: tuple[str, ...] = NAMES) -> list[tuple[str, int]]:
    """(name, token id) of each candidate that is one token with a leading space (and not the unknown token)."""
    out = []
    for name in candidates:
        ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id and tokenizer.decode(ids).strip() == name:
            out.append((name, int(ids[0])))
    return out


def _balanced(rng: np.random.Generator, n_values: int, n: int) -> np.ndarray:
    """n draws from range(n_values), each value appearing floor(n / n_values) or one more times, in random order."""
    reps = -(-n // n_values)
    return np.concatenate([rng.permutation(n_values) for _ in range(reps)])[:n]


def _other(rng: np.random.Generator, n_names: int, exclude: tuple[int, int]) -> int:
    """A name index drawn uniformly from those not in `exclude`."""
    pool = [i for i in range(n_names) if i not in exclude]
    return int(pool[rng.integers(len(pool))])


def make_prompts(n_prompts: int, n_names: int, seed: int = 0,
                 n_templates: int = len(TEMPLATES)) -> tuple[list[IOIPrompt], dict[str, list[IOIPrompt]]]:
    """`n_prompts` prompts and, for each attribute, their counterfactuals (that attribute changed, nothing else).

    IO, template and order are balanced; S = IO + an offset balanced over 1..n_names-1 (so S != IO); a new IO or S
    is drawn from the names the prompt does not use. Deterministic in `seed`.
    """
    if n_names < 3:
        raise IOIError(f"IOI needs at least 3 names, got {n_names}")
    rng = np.random.default_rng(seed)
    io = _balanced(rng, n_names, n_prompts)
    s = (io + 1 + _balanced(rng, n_names - 1, n_prompts)) % n_names
    order = _balanced(rng, 2, n_prompts)
    template = _balanced(rng, n_templates, n_prompts)
    prompts = [IOIPrompt(int(t), int(a), int(b), int(o)) for t, a, b, o in zip(template, io, s, order, strict=True)]
    counterfactuals = {
        "io": [dataclasses.replace(p, io=_other(rng, n_names, (p.io, p.s))) for p in prompts],
        "s": [dataclasses.replace(p, s=_other(rng, n_names, (p.io, p.s))) for p in prompts],
        "pos": [dataclasses.replace(p, order=1 - p.order) for p in prompts],
    }
    return prompts, counterfactuals


@dataclass
class TemplateBatch:
    """The prompts of one template: equal token length, names at the same positions."""

    template: int
    index: torch.Tensor
    "[n] positions of these prompts in the prompt list."
    tokens: torch.Tensor
    "[n, T] BOS then the prompt's tokens."
    slots: tuple[int, int, int]
    "Token positions of the names {0}, {1}, {2} (the last is S2)."
    prefix: dict = field(default_factory=dict, repr=False)
    "(model id, node position) -> the frozen KV cache of the tokens before the node (node_run)."


def tokenize_prompts(tokenizer, prompts: list[IOIPrompt], names: list[tuple[str, int]]) -> list[TemplateBatch]:
    """Token batches, one per template; an IOIError unless every prompt of a template has the same length and its
    names are single tokens at the template's slot positions."""
    words = [n for n, _ in names]
    ids = [i for _, i in names]
    bos = int(tokenizer.bos_token_id)
    batches = []
    for t in sorted({p.template for p in prompts}):
        index = [k for k, p in enumerate(prompts) if p.template == t]
        template = TEMPLATES[t]
        first = prompts[index[0]].names()
        slots = []
        for slot in range(3):  # BOS + the tokens before the slot (the name brings its own leading space)
            prefix = template[: template.index("{" + str(slot) + "}")].rstrip(" ")
            filled = prefix.format(*(words[i] for i in first[:slot]))
            slots.append(1 + len(tokenizer(filled, add_special_tokens=False)["input_ids"]))
        rows = []
        for k in index:
            row = [bos, *tokenizer(prompts[k].text(words), add_special_tokens=False)["input_ids"]]
            expected = [ids[i] for i in prompts[k].names()]
            if (rows and len(row) != len(rows[0])) or any(
                    pos >= len(row) or row[pos] != want for pos, want in zip(slots, expected, strict=True)):
                raise IOIError(f"template {t} ({template!r}) does not tokenise to one length with the names as single "
                               f"tokens at positions {slots}: {prompts[k].text(words)!r}")
            rows.append(row)
        batches.append(TemplateBatch(t, torch.tensor(index), torch.tensor(rows), (slots[0], slots[1], slots[2])))
    return batches


# ---- dictionaries and scores (pure) -------------------------------------------------------------------------


@dataclass
class SupervisedDictionary:
    mean: torch.Tensor
    "[d] E[x] (float64)."
    vectors: dict[str, torch.Tensor]
    "attribute -> [n_values, d] centred vectors u_a[v] = E[x | a = v] - E[x]."

    def reconstruct(self, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """[P, d] mean + sum over attributes of u_a[label]."""
        out = self.mean.expand(len(next(iter(labels.values()))), -1).clone()
        for attribute, u in self.vectors.items():
            out += u[labels[attribute]]
        return out


def supervised_dictionary(acts: torch.Tensor, labels: dict[str, torch.Tensor],
                          n_values: dict[str, int]) -> SupervisedDictionary:
    """The mean codes of acts [P, d] (float64); a value no prompt has gets a zero vector."""
    x = acts.double()
    mean = x.mean(0)
    vectors = {}
    for attribute, values in labels.items():
        sums = torch.zeros(n_values[attribute], x.shape[1], dtype=torch.float64).index_add_(0, values, x)
        counts = torch.bincount(values, minlength=n_values[attribute]).double()[:, None]
        vectors[attribute] = torch.where(counts > 0, sums / counts.clamp(min=1) - mean, torch.zeros_like(sums))
    return SupervisedDictionary(mean, vectors)


def f1_table(active: torch.Tensor, values: torch.Tensor, n_values: int) -> dict[str, torch.Tensor]:
    """Precision, recall and F1 [n_values, F] of each latent's firing (active [P, F], bool) for each value."""
    onehot = torch.nn.functional.one_hot(values, n_values).double()  # [P, V]
    on = active.double()
    tp = onehot.T @ on  # [V, F]
    n_active = on.sum(0)[None, :]
    n_value = onehot.sum(0)[:, None]
    precision = torch.where(n_active > 0, tp / n_active.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(n_value > 0, tp / n_value.clamp(min=1), torch.zeros_like(tp))
    total = n_active + n_value
    f1 = torch.where(total > 0, 2 * tp / total.clamp(min=1), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1}


def normalised(value: float, top: float, base: float, min_effect: float = 0.0) -> float | None:
    """(value - base) / (top - base), or None when |top - base| <= min_effect."""
    den = top - base
    if abs(den) <= min_effect:
        return None
    return (value - base) / den


def sufficiency(ld_splice: float, ld_clean: float, ld_mean: float, min_effect: float = 0.0) -> float | None:
    """Fraction of the clean logit diff, over mean-ablation, kept with the reconstruction spliced in."""
    return normalised(ld_splice, ld_clean, ld_mean, min_effect)


def necessity(ld_ablated: float, ld_clean: float, ld_mean: float, min_effect: float = 0.0) -> float | None:
    """Drop of the logit diff when the reconstruction is ablated (error kept), as a fraction of mean-ablation's."""
    frac = normalised(ld_ablated, ld_clean, ld_mean, min_effect)
    return None if frac is None else 1.0 - frac


def sae_edit_codes(z: torch.Tensor, old: torch.Tensor, new: torch.Tensor, f1: torch.Tensor,
                   value_means: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes with at most n latents changed per row, and the number changed [P].

    Candidates: latents active in the row, ranked by F1 for its old value (set to 0), and latents ranked by F1 for
    the new value (set to value_means[new]); the two lists are merged by F1 (on a tie the earlier rank in its own
    list first, then the removal), so equal F1s alternate removing and adding; the first n distinct latents with
    F1 > 0 are changed.
    """
    out = z.clone()
    changed = torch.zeros(z.shape[0], dtype=torch.long)
    for r in range(z.shape[0]):
        remove = torch.where((z[r] > 0) & (f1[old[r]] > 0))[0]
        add = torch.where(f1[new[r]] > 0)[0]
        candidates = []
        for kind, latents, scores in ((0, remove, f1[old[r]]), (1, add, f1[new[r]])):
            ranked = latents[torch.argsort(scores[latents], descending=True, stable=True)][:n].tolist()
            candidates += [(-float(scores[f]), rank, kind, f) for rank, f in enumerate(ranked)]
        seen: set[int] = set()
        for _, _, kind, latent in sorted(candidates):
            if len(seen) == n:
                break
            if latent in seen:
                continue
            seen.add(latent)
            out[r, latent] = 0.0 if kind == 0 else value_means[new[r], latent]
        changed[r] = len(seen)
    return out, changed


# ---- the model at the node ----------------------------------------------------------------------------------


def node_position(batch: TemplateBatch, position: str) -> int:
    return batch.slots[2] if position == "s2" else batch.tokens.shape[1] - 1


@torch.no_grad()
def _prefix_cache(model, batch: TemplateBatch, pos: int):
    """The keys and values of the tokens before the node, computed once per batch and position, frozen."""
    key = (id(model), pos)
    if key not in batch.prefix:
        # deferred: transformer_lens costs seconds to import, paid only when a model is loaded (docs/ARCHITECTURE.md)
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch.tokens.shape[0])
        prefix = batch.tokens[:, :pos]
        model(prefix, return_type=None, attention_mask=torch.ones_like(prefix), past_kv_cache=kv)
        kv.freeze()
        batch.prefix[key] = kv
    return batch.prefix[key]


@torch.no_grad()
def node_run(model, hook: str, batches: list[TemplateBatch], position: str, token_ids: torch.Tensor,
             values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-position logits of `token_ids` [P, len(token_ids)], the node's activations [P, d] as they came in),
    with the node's activation replaced by values[p] for each prompt p when values ([P, d]) are given.

    The tokens before the node do not see it: their keys and values are computed once (a frozen KV cache) and
    each run feeds only the node's position onward, up to the last position's logits (the clean run too, so an
    identity splice reproduces it exactly)."""
    n_prompts = sum(len(b.index) for b in batches)
    logits = torch.zeros(n_prompts, len(token_ids))
    acts: torch.Tensor | None = None
    for batch in batches:
        pos = node_position(batch, position)
        kv = _prefix_cache(model, batch, pos)
        seen = []

        def splice(act: torch.Tensor, hook, batch=batch, seen=seen) -> torch.Tensor:
            flat = act.reshape(act.shape[0], act.shape[1], -1)  # the suffix: the node is its first position
            seen.append(flat[:, 0].detach().float().to("cpu", copy=True))  # the scores: host maths on [P, d]
            if values is None:
                return act
            flat = flat.clone()
            flat[:, 0] = values[batch.index].to(flat.device, flat.dtype)
            return flat.reshape(act.shape)

        suffix = batch.tokens[:, pos:]
        resid = model.run_with_hooks(suffix, fwd_hooks=[(hook, splice)], attention_mask=torch.ones_like(suffix),
                                     past_kv_cache=kv, stop_at_layer=model.cfg.n_layers)[:, -1:]
        if not seen:
            raise IOIError(f"the hook {hook!r} is not inside the model's blocks: IOI splices only there")
        if model.cfg.normalization_type is not None:
            resid = model.ln_final(resid)
        out = model.unembed(resid)[:, 0].float()
        cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
        if cap > 0:
            out = cap * torch.tanh(out / cap)
        logits[batch.index] = out[:, token_ids.to(out.device)].cpu()
        if acts is None:
            acts = torch.zeros(n_prompts, seen[0].shape[1])
        acts[batch.index] = seen[0]
    assert acts is not None
    return logits, acts


def check_width(model, hook: str, d_in: int, sae_label: str = "the SAE") -> None:
    """An IOIError unless the model has `hook` and its width there is the SAE's d_in."""
    if hook not in model.hook_dict:
        raise IOIError(f"{_model_name(model)} has no hook {hook!r}")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([[int(model.tokenizer.bos_token_id)] * 2]), names_filter=[hook])
    width = cache[hook][0, 0].numel()
    if width != d_in:
        raise IOIError(f"{sae_label} has d_in={d_in} but {_model_name(model)}'s {hook} has width {width}")


def check_request(n_prompts: int, n_names: int, n_latents: tuple[int, ...], position: str = "s2") -> None:
    """What can be checked before a model is loaded."""
    if n_names < MIN_NAMES:
        raise IOIError(f"--names must be at least {MIN_NAMES}, got {n_names}")
    if n_prompts < 2 * n_names:
        raise IOIError(f"--prompts {n_prompts} is too few for {n_names} names: give at least {2 * n_names} "
                       "(2 x the names, so each name is IO and S at least twice)")
    if not n_latents or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in n_latents):
        raise IOIError(f"--n-latents must be positive integers, got {list(n_latents)}")
    if position not in POSITIONS:
        raise IOIError(f"--position must be one of {POSITIONS}, got {position!r}")


def parse_n_latents(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, e.g. 1,2,4,8."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        out = tuple(int(p) for p in parts)
    except ValueError:
        out = ()
    if not out or any(n < 1 for n in out):
        raise IOIError(f"--n-latents must be comma-separated positive integers, got {text!r}")
    return out


def _model_name(model) -> str:
    return str(getattr(model, "saewb_name", None) or model.cfg.model_name)


# ---- the evaluation -----------------------------------------------------------------------------------------


@dataclass
class IOIResult:
    model: str
    hook: str
    position: str
    "Where the node sits: s2 (the second S token) or end (the last token)."
    n_prompts: int
    names: list[str]
    seed: int
    logit_diff_clean: float
    "Mean logit(IO) - logit(S) at the last position of the clean prompts."
    accuracy: float
    "Fraction of clean prompts with logit diff > 0."
    logit_diff_mean_ablated: float
    "Mean logit diff with the node mean-ablated."
    logit_diffs: dict
    "method -> {splice, ablate}: the mean logit diffs behind sufficiency and necessity."
    sufficiency: dict
    "method (sae, supervised) -> fraction of the clean logit diff over mean-ablation kept by the reconstruction."
    necessity: dict
    "method -> logit diff drop when the reconstruction is ablated (error kept), over mean-ablation's."
    control: dict
    "supervised -> attribute -> {prompt, patch}; sae -> n -> attribute -> {prompt, patch, changed}; patch -> "
    "attribute -> fraction; metric -> attribute -> {clean, counterfactual, patch} (mean M)."
    f1: dict
    "attribute -> {mean: mean over values of the best latent F1, per_value: value -> best F1}."
    fvu: dict
    "method -> fraction of the node's variance (over prompts) the reconstruction leaves unexplained."
    sae_l0: float
    "Mean active SAE latents at the node."
    n_latents: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


@torch.no_grad()
def run_ioi(model, sae_model, hook: str | None = None, n_prompts: int = 200, seed: int = 0,
            n_latents: tuple[int, ...] = N_LATENTS, position: str = "s2", n_names: int = N_NAMES,
            min_effect: float = MIN_EFFECT, sae_label: str = "the SAE") -> IOIResult:
    """Sufficiency, necessity, control and F1 of the SAE and of the supervised dictionary at (hook, position); the
    hook defaults to the SAE's own (its metadata's hook_name)."""
    started = time.perf_counter()
    hook = hook or sae_model.metadata.get("hook_name")
    if not hook:
        raise IOIError(f"{sae_label} does not name its hook (cfg.json metadata): pass a hook")
    check_request(n_prompts, n_names, tuple(n_latents), position)
    if max(n_latents) > sae_model.cfg.n_features:
        raise IOIError(f"--n-latents {max(n_latents)} exceeds the SAE's {sae_model.cfg.n_features} latents")
    found = single_token_names(model.tokenizer)
    if len(found) < MIN_NAMES:
        raise IOIError(f"{_model_name(model)}'s tokenizer has {len(found)} of our {len(NAMES)} first names as single "
                       f"tokens with a leading space; IOI needs at least {MIN_NAMES}")
    names = found[:n_names]
    if n_prompts < 2 * len(names):
        raise IOIError(f"--prompts {n_prompts} is too few for {len(names)} names: give at least {2 * len(names)}")
    check_width(model, hook, sae_model.cfg.d_in, sae_label)

    prompts, cfs = make_prompts(n_prompts, len(names), seed)
    batches = tokenize_prompts(model.tokenizer, prompts, names)
    cf_batches = {a: tokenize_prompts(model.tokenizer, cfs[a], names) for a in ATTRIBUTES}
    token_ids = torch.tensor([i for _, i in names])
    n_values = {"io": len(names), "s": len(names), "pos": 2}
    labels = {a: torch.tensor([p.label(a) for p in prompts]) for a in ATTRIBUTES}
    cf_labels = {a: torch.tensor([p.label(a) for p in cfs[a]]) for a in ATTRIBUTES}
    rows = torch.arange(n_prompts)

    def metric(logits: torch.Tensor, io: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return logits[rows, io] - logits[rows, s]

    def run(values: torch.Tensor | None) -> torch.Tensor:
        return node_run(model, hook, batches, position, token_ids, values)[0]

    clean_logits, x = node_run(model, hook, batches, position, token_ids)
    ld = metric(clean_logits, labels["io"], labels["s"])
    ld_clean = _mean(ld)
    tol = min_effect * abs(ld_clean)
    ld_mean = _mean(metric(run(x.mean(0).expand_as(x)), labels["io"], labels["s"]))

    sup = supervised_dictionary(x, labels, n_values)
    x_sup = sup.reconstruct(labels).float()
    device = sae_model.W_enc.device  # the SAE's (the model's, from the CLI); the scores stay on the host

    def encode(rows: torch.Tensor) -> torch.Tensor:
        return sae_model.encode(rows.to(device)).float().cpu()

    def decode(codes: torch.Tensor) -> torch.Tensor:
        return sae_model.decode(codes.to(device), x.to(device)).float().cpu()

    z = encode(x)
    x_sae = decode(z)
    recon = {"supervised": x_sup, "sae": x_sae}
    var = float(((x.double() - x.double().mean(0)) ** 2).sum())
    logit_diffs, suff, nec, fvu = {}, {}, {}, {}
    for method, x_hat in recon.items():
        spliced = _mean(metric(run(x_hat), labels["io"], labels["s"]))
        ablated = _mean(metric(run(x - x_hat + x_hat.mean(0)), labels["io"], labels["s"]))
        logit_diffs[method] = {"splice": spliced, "ablate": ablated}
        suff[method] = sufficiency(spliced, ld_clean, ld_mean, tol)
        nec[method] = necessity(ablated, ld_clean, ld_mean, tol)
        fvu[method] = float(((x.double() - x_hat.double()) ** 2).sum()) / var if var > 0 else None

    active = z > 0
    tables = {a: f1_table(active, labels[a], n_values[a])["f1"] for a in ATTRIBUTES}
    value_names = {"io": [n for n, _ in names], "s": [n for n, _ in names], "pos": list(ORDERS)}
    f1 = {}
    for a in ATTRIBUTES:
        best = tables[a].max(1).values
        f1[a] = {"mean": float(best.mean()), "per_value": dict(zip(value_names[a], best.tolist(), strict=True))}

    control: dict = {"supervised": {}, "sae": {str(n): {} for n in n_latents}, "patch": {}, "metric": {}}
    for a in ATTRIBUTES:
        io_new = torch.tensor([p.io for p in cfs[a]])
        s_new = torch.tensor([p.s for p in cfs[a]])
        cf_logits, x_cf = node_run(model, hook, cf_batches[a], position, token_ids)
        m_clean = _mean(metric(clean_logits, io_new, s_new))
        m_target = _mean(metric(cf_logits, io_new, s_new))
        m_patch = _mean(metric(run(x_cf), io_new, s_new))
        control["metric"][a] = {"clean": m_clean, "counterfactual": m_target, "patch": m_patch}
        control["patch"][a] = normalised(m_patch, m_target, m_clean, tol)

        def score(m_edit: float, m_patch=m_patch, m_clean=m_clean, m_target=m_target) -> dict:
            return {"prompt": normalised(m_edit, m_target, m_clean, tol),
                    "patch": normalised(m_edit, m_patch, m_clean, tol)}

        edited = x + (sup.vectors[a][cf_labels[a]] - sup.vectors[a][labels[a]]).float()
        control["supervised"][a] = score(_mean(metric(run(edited), io_new, s_new)))
        onehot = torch.nn.functional.one_hot(labels[a], n_values[a]).float()
        value_means = (onehot.T @ z) / onehot.sum(0).clamp(min=1)[:, None]
        for n in n_latents:
            z_edit, changed = sae_edit_codes(z, labels[a], cf_labels[a], tables[a].float(), value_means, n)
            edited = x + decode(z_edit) - x_sae
            entry = score(_mean(metric(run(edited), io_new, s_new)))
            entry["changed"] = float(changed.double().mean())
            control["sae"][str(n)][a] = entry

    return IOIResult(
        model=_model_name(model), hook=hook, position=position, n_prompts=n_prompts, names=[n for n, _ in names],
        seed=seed, logit_diff_clean=ld_clean, accuracy=float((ld > 0).double().mean()),
        logit_diff_mean_ablated=ld_mean, logit_diffs=logit_diffs, sufficiency=suff, necessity=nec, control=control,
        f1=f1, fvu=fvu, sae_l0=float(active.double().sum(1).mean()), n_latents=list(n_latents),
        seconds=round(time.perf_counter() - started, 1),
    )
