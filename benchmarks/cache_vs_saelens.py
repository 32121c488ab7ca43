"""Activation-caching throughput: our `saewb cache` against SAELens' CacheActivationsRunner, on CPU.

    .venv/bin/python benchmarks/cache_vs_saelens.py --tokens 16384 --repeats 3

(needs .venv for ours and .venv-bench for SAELens; `benchmarks/setup_bench_venv.sh` builds the latter).

Comparable, by construction:
* the same model object: both load SmolLM2-135M with ``activations.load_model("smollm2-135m")``.
  SAELens cannot load SmolLM2 by name offline, so its runner's ``load_model`` (the name imported
  in ``sae_lens.cache_activations_runner``) is replaced by a function returning that
  HookedTransformer: only the loading is replaced, the forward passes are SAELens' own;
* the same hook (blocks.6.hook_resid_post; both stop the forward after block 6), the same token
  contexts (the ``tokens.npy`` our cacher writes, BOS included, fed to SAELens as a pre-tokenised
  ``input_ids`` dataset, so its prepend_bos plays no part), 32 contexts of 128 per forward,
  float32 storage, torch's default threads, one warm-up forward of one batch in each process;
* tokens/s counts tokens run through the model (contexts x 128, BOS included) for both.

Not comparable, and reported as such:
* rows stored: we drop the BOS rows (one per context), SAELens stores every position (and a
  token_ids column), so bytes written differ by more than the format;
* what each timer covers. Ours: ``build_cache`` minus its corpus loading and tokenising (SAELens
  gets the contexts already tokenised); it includes the manifest, sha256 checksums and the shard
  writes. SAELens: ``CacheActivationsRunner.run()``, which includes building the Arrow shards and
  consolidating them; its constructor (building the ActivationsStore) is timed apart;
* model loading is timed apart and excluded from both; peak RSS (``ru_maxrss``) is the whole process:
  imports, the model, and the caching.

SAELens settings: ``shuffle=False`` (ours shuffles when reading, not when caching; SAELens' default
True only adds an index mapping); ``buffer_size_gb`` lowered from its 2 GB default to the run's own
size, because otherwise the runner fills a whole 2 GB buffer and cycles the dataset far past the
token budget. Everything else is SAELens' default. Runs alternate ours/SAELens, each in a fresh
process; after each timed SAELens run the child checks that its token_ids equal ``tokens.npy``
and its non-BOS activations match our reference cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
HOOK = "blocks.6.hook_resid_post"
D_IN = 576
CONTEXT = 128
BATCH = 32
DTYPE = "float32"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_timed_model():
    import torch

    from activations import load_model

    torch.manual_seed(0)
    started = time.perf_counter()
    model = load_model(MODEL)
    load_s = time.perf_counter() - started
    return model, load_s


def warm_up(model, tokens) -> None:
    """One forward of one batch, as both frameworks run it, so neither pays first-call costs in its timer."""
    import torch

    batch = torch.from_numpy(tokens[:BATCH].astype("int64"))
    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=[], stop_at_layer=int(HOOK.split(".")[1]) + 1, return_type=None)


def child_ours(out: Path, tokens_path: Path | None, n_tokens: int) -> dict:
    """Build our cache in-process with a preloaded model; with tokens_path None, just make the reference."""
    import importlib.metadata

    import numpy as np
    import torch

    import activations.cache as cache

    model, load_s = load_timed_model()
    rss_after_load = peak_rss_mb()
    tokenise_s = 0.0
    make_tokens = cache.make_tokens

    def timed_make_tokens(*args, **kwargs):  # build_cache calls it by its module-level name
        nonlocal tokenise_s
        started = time.perf_counter()
        result = make_tokens(*args, **kwargs)
        tokenise_s += time.perf_counter() - started
        return result

    cache.make_tokens = timed_make_tokens
    cfg = cache.CacheConfig(
        model=MODEL, hooks=[HOOK], out=str(out), tokens=n_tokens, context=CONTEXT, dtype=DTYPE, batch_size=BATCH
    )
    if tokens_path is not None:
        warm_up(model, np.load(tokens_path))
    started = time.perf_counter()
    manifest = cache.build_cache(cfg, model=model, progress=False)
    wall = time.perf_counter() - started
    rss = peak_rss_mb()
    tokens = np.load(out / "tokens.npy")
    same = None if tokens_path is None else bool(np.array_equal(tokens, np.load(tokens_path)))
    return {
        "framework": "sae-workbench",
        "version": importlib.metadata.version("sae-workbench"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model_load_s": load_s,
        "tokenise_s": tokenise_s,
        "timed_s": wall - tokenise_s,
        "end_to_end_s": wall,
        "forward_and_shards_s": manifest["last_run"]["seconds"],
        "tokens_run": int(tokens.size),
        "rows_stored": int(manifest["n_tokens"]),
        "bytes_written": folder_bytes(out),
        "peak_rss_mb": rss,
        "rss_after_model_load_mb": rss_after_load,
        "tokens_match_reference": same,
    }


def child_saelens(out: Path, tokens_path: Path, reference: Path) -> dict:
    """Run SAELens' CacheActivationsRunner on our contexts with our model object."""
    import importlib.metadata
    import warnings

    import numpy as np
    import sae_lens.cache_activations_runner as runner_module
    import torch
    from datasets import Dataset
    from sae_lens.config import CacheActivationsRunnerConfig

    # ActivationsStore compares the number of *contexts* with the number of *tokens* and warns of
    # extra epochs that do not happen here (the runner stops after training_tokens).
    warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
    model, load_s = load_timed_model()

    def preloaded_model(model_class_name, model_name, device=None, model_from_pretrained_kwargs=None, **_):
        assert model_name == MODEL and model_class_name == "HookedTransformer", (model_class_name, model_name)
        return model

    runner_module.load_model = preloaded_model
    tokens = np.load(tokens_path)
    n_tokens = int(tokens.size)
    bytes_per_token = D_IN * 4
    dataset = Dataset.from_dict({"input_ids": tokens.astype(np.int64).tolist()})
    rss_after_load = peak_rss_mb()
    cfg = CacheActivationsRunnerConfig(
        dataset_path="saewb-tokens.npy (override_dataset)",
        model_name=MODEL,
        model_batch_size=BATCH,
        hook_name=HOOK,
        d_in=D_IN,
        training_tokens=n_tokens,
        context_size=CONTEXT,
        new_cached_activations_path=str(out),
        shuffle=False,
        dtype=DTYPE,
        device="cpu",
        # The whole run in one buffer (under the 2 GB default), rounded so it holds exactly n_tokens.
        buffer_size_gb=min(2.0, (n_tokens * bytes_per_token + bytes_per_token // 2) / 1e9),
        prepend_bos=False,
    )
    warm_up(model, tokens)
    started = time.perf_counter()
    runner = runner_module.CacheActivationsRunner(cfg, override_dataset=dataset)
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    result = runner.run()
    run_s = time.perf_counter() - started
    rss = peak_rss_mb()

    # Checks (outside the timer and after the RSS reading).
    result = result.with_format("numpy")
    token_ids = np.asarray(result[:]["token_ids"])
    same_tokens = token_ids.shape == tokens.shape and bool(np.array_equal(token_ids, tokens))
    manifest = json.loads((reference / "manifest.json").read_text())
    shard = manifest["shards"][0]
    ours = np.fromfile(reference / shard["files"][HOOK]["acts"]["path"], dtype=np.float32).reshape(-1, D_IN)
    c0, c1 = shard["contexts"]
    c1 = min(c1, c0 + 64, len(result))
    theirs = np.asarray(result[c0:c1][HOOK])
    keep = tokens[c0:c1] != manifest["bos_token_id"]
    mine = ours[: int(keep.sum())]
    max_diff = float(np.abs(theirs[keep] - mine).max())
    return {
        "framework": "sae-lens",
        "version": importlib.metadata.version("sae-lens"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model_load_s": load_s,
        "runner_init_s": init_s,
        "timed_s": run_s,
        "end_to_end_s": init_s + run_s,
        "tokens_run": int(len(result) * CONTEXT),
        "rows_stored": int(len(result) * CONTEXT),
        "bytes_written": folder_bytes(out),
        "peak_rss_mb": rss,
        "rss_after_model_load_mb": rss_after_load,
        "tokens_match_reference": same_tokens,
        "acts_max_abs_diff_vs_ours": max_diff,
        "settings": {
            "shuffle": cfg.shuffle,
            "buffer_size_gb": cfg.buffer_size_gb,
            "n_buffers": cfg.n_buffers,
            "n_batches_in_buffer": cfg.n_batches_in_buffer,
            "streaming": cfg.streaming,
            "autocast_lm": cfg.autocast_lm,
            "compile_llm": cfg.compile_llm,
        },
    }


def spawn(python: str, args: list[str], result_file: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    cmd = [python, str(Path(__file__).resolve()), *args, "--child-result", str(result_file)]
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(result_file.read_text())


def summarise(runs: list[dict]) -> dict:
    rates = [r["tokens_run"] / r["timed_s"] for r in runs]
    return {
        "framework": runs[0]["framework"],
        "version": runs[0]["version"],
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "end_to_end_tokens_per_s_median": statistics.median(r["tokens_run"] / r["end_to_end_s"] for r in runs),
        "tokens_run": runs[0]["tokens_run"],
        "rows_stored": runs[0]["rows_stored"],
        "bytes_written": runs[0]["bytes_written"],
        "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in runs),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
        "model_load_s_median": statistics.median(r["model_load_s"] for r in runs),
        "runs": runs,
    }


def markdown(summaries: list[dict]) -> str:
    lines = [
        "| framework | version | tokens/s median (min-max) | rows stored | bytes written | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['framework']} | {s['version']} | {s['tokens_per_s_median']:,.0f} "
            f"({s['tokens_per_s_min']:,.0f}-{s['tokens_per_s_max']:,.0f}) | {s['rows_stored']:,} | "
            f"{s['bytes_written']:,} | {s['peak_rss_mb_max']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokens",
        type=int,
        default=16_384,
        help="tokens run through the model per run, rounded up to whole batches of 32x128 "
        "(so both frameworks run the same full batches); default 16384",
    )
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per framework, alternating; default 3")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench/cache-compare"),
        help="work folder: reference/ (tokens.npy), per-run caches (deleted after each run) and "
        "results.json; default runs/bench/cache-compare",
    )
    parser.add_argument("--ours-python", default=str(REPO / ".venv/bin/python"), help="interpreter for our runs")
    parser.add_argument(
        "--saelens-python",
        default=str(REPO / ".venv-bench/bin/python"),
        help="interpreter for SAELens runs (the venv with sae-lens)",
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's cache folder")
    parser.add_argument("--child", choices=["ours", "saelens", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-tokens", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    per_batch = BATCH * CONTEXT
    n_tokens = -(-args.tokens // per_batch) * per_batch
    out = args.out if args.out.is_absolute() else REPO / args.out
    reference = out / "reference"

    if args.child:
        if args.child == "saelens":
            result = child_saelens(args.child_out, args.child_tokens, reference)
        else:
            result = child_ours(args.child_out, args.child_tokens if args.child == "ours" else None, n_tokens)
        args.child_result.write_text(json.dumps(result))
        return 0

    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if reference.exists():
        shutil.rmtree(reference)
    runs_dir = out / "runs"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)
    runs_dir.mkdir(parents=True)
    tokens_path = reference / "tokens.npy"
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "child.json"
        print(f"[bench] reference cache of {n_tokens:,} tokens (fixes the contexts both use)", file=sys.stderr)
        spawn(
            args.ours_python,
            ["--child", "reference", "--child-out", str(reference), "--tokens", str(n_tokens), "--out", str(out)],
            result_file,
        )
        results: dict[str, list[dict]] = {"ours": [], "saelens": []}
        for repeat in range(args.repeats):
            for name, python in (("ours", args.ours_python), ("saelens", args.saelens_python)):
                run_out = runs_dir / f"{name}-{repeat}"
                result = spawn(
                    python,
                    [
                        "--child",
                        name,
                        "--child-out",
                        str(run_out),
                        "--child-tokens",
                        str(tokens_path),
                        "--tokens",
                        str(n_tokens),
                        "--out",
                        str(out),
                    ],
                    result_file,
                )
                if not result["tokens_match_reference"]:
                    raise SystemExit(f"{name} run {repeat} did not see the reference tokens")
                rate = result["tokens_run"] / result["timed_s"]
                print(
                    f"[bench] repeat {repeat} {name}: {rate:,.0f} tokens/s, peak RSS {result['peak_rss_mb']:,.0f} MB",
                    file=sys.stderr,
                )
                results[name].append(result)
                if not args.keep:
                    shutil.rmtree(run_out)
    summaries = [summarise(results["ours"]), summarise(results["saelens"])]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": MODEL,
        "hook": HOOK,
        "context": CONTEXT,
        "batch_contexts": BATCH,
        "dtype": DTYPE,
        "device": "cpu",
        "tokens_run": n_tokens,
        "rate_counts": "tokens run through the model (contexts x 128, BOS included) / timed seconds",
        "results": summaries,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(summaries))
    ours, theirs = summaries
    print(
        f"\nTokens run per run: {n_tokens:,} ({n_tokens // CONTEXT} contexts x {CONTEXT}); "
        f"ratio ours/SAELens (median tokens/s): {ours['tokens_per_s_median'] / theirs['tokens_per_s_median']:.2f}"
    )
    print(
        "End-to-end medians (ours incl. corpus tokenising, SAELens incl. runner construction): "
        f"ours {ours['end_to_end_tokens_per_s_median']:,.0f}, "
        f"SAELens {theirs['end_to_end_tokens_per_s_median']:,.0f} tokens/s; model load (excluded): "
        f"ours {ours['model_load_s_median']:.1f} s, SAELens {theirs['model_load_s_median']:.1f} s"
    )
    diffs = [r["acts_max_abs_diff_vs_ours"] for r in results["saelens"]]
    print(f"SAELens non-BOS activations vs our reference cache: max |diff| {max(diffs):.2e}")
    print(f"Wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
