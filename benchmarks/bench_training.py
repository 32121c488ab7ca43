"""Side-by-side SAE training benchmark: sae-workbench vs SAELens vs sparsify on one activation cache.

    make bench                                    # the full run (~30 min on 2 cores)
    .venv/bin/python benchmarks/bench_training.py --steps 5 --repeats 1 --n-features 1024 --k 16 \\
        --batch-size 1024 --out runs/bench-smoke --report runs/bench-smoke/BENCHMARKS.md   # a smoke run

Every framework trains with the same F, k, batch, steps, constant Adam lr and seed on the same rows
in the same order, each run in its own process (peak RSS per run), runs alternating
(ours, saelens, sparsify, ours, ...) so drift in machine load hits all of them. Pairs: TopK in all
three; Mutual-Choice (ours) and Feature-Choice (ours) against SAELens BatchTopK, the nearest peer
(sparsify has no batch-level rule). Before every repeat the fp32 GEMM rate at the encoder's shape
[B, d] @ [d, F] is measured; two floors come from it: the one-GEMM floor GEMM FLOP/s / (2 d F) tokens/s
(the encoder's forward GEMM alone, which no exact TopK step can beat: with sparse kernels nothing else is
O(B d F)), and the dense-encoder floor GEMM FLOP/s / (6 d F) (forward plus the two backward GEMMs of an
encoder trained densely). Writes <out>/results.json, then BENCHMARKS.md and
its figure from that JSON (benchmarks/render_report.py, run with .venv-bench for matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_protocol import save_data
from step_syncs import synchronize

from activations.storage import atomic_write_json
from sae import default_lr
from sae.devices import resolve_device
from sae.errors import SAEConfigError

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
RUNNERS = {"ours": "train_ours.py", "saelens": "train_saelens.py", "sparsify": "train_sparsify.py"}
ARCHS = ("topk", "mutual_choice", "feature_choice")
PEERS: dict[str, list[tuple[str, str]]] = {
    "topk": [("saelens", "topk"), ("sparsify", "topk")],
    "mutual_choice": [("saelens", "batchtopk")],
    "feature_choice": [("saelens", "batchtopk")],
}
"""Our arch -> the (framework, arch) peers it is compared with."""
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HOOK = "blocks.6.hook_resid_post"
CONTEXT = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None,
                        help="activation cache folder (saewb cache) to read; default: create "
                             f"<out>/cache-<tokens> with `saewb cache --model {DEFAULT_MODEL} --hook {DEFAULT_HOOK}` "
                             "holding just enough rows")
    parser.add_argument("--steps", type=int, default=30,
                        help="optimiser steps per run, warm-up included (default 30: ~25 min in all on 2 cores)")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="leading steps of every run that are trained but not timed (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per (framework, arch); tokens/s is their median (default 3)")
    parser.add_argument("--n-features", type=int, default=9216, help="latents F (default 9216 = 16 x 576)")
    parser.add_argument("--k", type=int, default=32, help="active latents per token; mean per token for "
                        "Mutual-Choice/BatchTopK; k*B/F tokens per latent for Feature-Choice (default 32)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per step B (default 4096)")
    parser.add_argument("--lr", type=float, default=None,
                        help="constant Adam learning rate for every framework (default 2e-4 / sqrt(F / 2^14), "
                             "the default of both sae-workbench and sparsify)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed passed to every framework")
    parser.add_argument("--heldout-rows", type=int, default=16384,
                        help="rows after the training rows in the shuffled stream, used for FVU (default 16384)")
    parser.add_argument("--dead-tokens", type=int, default=None,
                        help="tokens without firing before a latent counts as dead for the AuxK loss, the same in "
                             "every framework (default: ours, min(10M, 20%% of the run's tokens))")
    parser.add_argument("--archs", default=",".join(ARCHS),
                        help="our architectures to benchmark, comma-separated: topk (vs SAELens TopK and sparsify), "
                             "mutual_choice and feature_choice (vs SAELens BatchTopK) (default: all three)")
    parser.add_argument("--frameworks", default=",".join(RUNNERS),
                        help="frameworks to run, comma-separated from ours, saelens, sparsify (default: all)")
    parser.add_argument("--saelens-b-dec-init", choices=("mean", "zeros"), default="mean",
                        help="SAELens b_dec start: mean = scaled mean of the first batch (sparsify's rule; default), "
                             "zeros = SAELens 6's own init, which leaves a short run's FVU above 1")
    parser.add_argument("--ours-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra sae.train option for our runs, e.g. sparse_kernels=false (repeatable)")
    parser.add_argument("--device", default="cpu",
                        help="where every framework trains: cpu (default), cuda or cuda:N; on CUDA sparsify uses its "
                             "Triton decoder, on the CPU its eager one; the GEMM floor is measured on the same device")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench",
                        help="work folder: cache, exported .npy rows, results.json (default runs/bench)")
    parser.add_argument("--report", type=Path, default=HERE / "BENCHMARKS.md",
                        help="Markdown report to write; the figure training_throughput.png goes beside it "
                             "(default benchmarks/BENCHMARKS.md)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="the figure's path (default: training_throughput.png beside --report)")
    parser.add_argument("--render-only", action="store_true",
                        help="skip the runs: re-render the report from <out>/results.json")
    args = parser.parse_args(argv)
    args.archs = _split(parser, "--archs", args.archs, ARCHS)
    args.frameworks = _split(parser, "--frameworks", args.frameworks, tuple(RUNNERS))
    if "ours" not in args.frameworks:
        parser.error("--frameworks must include ours (every comparison is against it)")
    if not 0 <= args.warmup_steps < args.steps:
        parser.error("--warmup-steps must be in [0, --steps)")
    for name in ("steps", "repeats", "n_features", "k", "batch_size", "heldout_rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.device = str(resolve_device(args.device))
    except SAEConfigError as exc:
        parser.error(f"--device: {exc}")
    args.lr = args.lr or default_lr(args.n_features)
    args.dead_tokens = args.dead_tokens or default_dead_tokens(args.steps * args.batch_size)
    return args


def default_dead_tokens(run_tokens: int) -> int:
    """AuxK's dead-latent window of every framework in a run of `run_tokens`: ours, min(10M, 20% of the run)."""
    return min(10_000_000, max(1, run_tokens // 5))


def _split(parser: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(items) - set(allowed))
    if unknown or not items:
        parser.error(f"{flag}: unknown or empty {unknown or value!r}; choose from {', '.join(allowed)}")
    return items


# ---- data -------------------------------------------------------------------------------------


def ensure_cache(args: argparse.Namespace, rows: int) -> Path:
    """The cache to read: --cache, or a default-model cache just big enough, created once under --out."""
    if args.cache is not None:
        return args.cache
    tokens = math.ceil(rows * CONTEXT / (CONTEXT - 1) / CONTEXT) * CONTEXT + CONTEXT  # BOS rows are dropped
    path = args.out / f"cache-{tokens}"
    if not (path / "manifest.json").exists() or not json.loads((path / "manifest.json").read_text()).get("complete"):
        saewb = Path(sys.executable).parent / "saewb"
        command = [str(saewb), "cache", "--model", DEFAULT_MODEL, "--hook", DEFAULT_HOOK, "--tokens", str(tokens),
                   "--out", str(path)]
        print(f"[bench] no --cache: building one ({tokens:,} tokens, ~2,000 tokens/s on 2 cores): "
              f"{shlex.join(command)}", file=sys.stderr)
        subprocess.run(command, check=True, cwd=ROOT)
    return path


def export_data(args: argparse.Namespace) -> dict[str, Any]:
    """Write train.npy (steps*B rows in the shuffled stream's order) and heldout.npy (the next rows)."""
    import activations

    n_train, n_held = args.steps * args.batch_size, args.heldout_rows
    cache_path = ensure_cache(args, n_train + n_held)
    cache = activations.load_cache(cache_path)
    folder = args.out / "data"
    meta = {"cache": str(Path(cache_path).resolve()), "cache_tokens": cache.n_tokens, "model": cache.model,
            "hook": cache.hooks[0], "d_in": cache.d_in, "train_rows": n_train, "heldout_rows": n_held,
            "batch": args.batch_size, "order": "iter_batches(batch, shuffle=True, seed=0)"}
    if (folder / "meta.json").exists() and json.loads((folder / "meta.json").read_text()) == meta:
        return meta
    if cache.n_tokens < n_train + n_held:
        raise SystemExit(f"{cache_path} holds {cache.n_tokens:,} rows; {args.steps} steps x {args.batch_size} + "
                         f"{n_held} held-out rows need {n_train + n_held:,}. Pass a bigger --cache or fewer --steps.")
    chunks, held = [], 0
    for batch in cache.iter_batches(args.batch_size, shuffle=True, seed=0):
        chunks.append(batch.numpy())
        held += batch.shape[0]
        if held >= n_train + n_held:
            break
    rows = np.concatenate(chunks)[: n_train + n_held].astype(np.float32)
    save_data(folder, rows[:n_train], rows[n_train:])
    atomic_write_json(folder / "meta.json", meta)  # last: its presence marks a finished export
    return meta


# ---- measurements -----------------------------------------------------------------------------


@torch.no_grad()
def gemm_flops(batch: int, d_in: int, n_features: int, reps: int = 5, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, warmups: int = 1) -> float:
    """Median FLOP/s of [B, d] @ [d, F] in `dtype` into a preallocated output (the encoder's forward GEMM) on
    `device`, after `warmups` untimed products (on CUDA each product is timed to its completion). make bench,
    profile_step and bench_gpu all measure their floor with this one function."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(batch, d_in, generator=generator).to(device=device, dtype=dtype)
    w = torch.randn(d_in, n_features, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(batch, n_features, device=device, dtype=dtype)
    for _ in range(max(warmups, 1)):
        torch.matmul(a, w, out=out)
    times = []
    for _ in range(reps):
        synchronize(out.device)
        began = time.perf_counter()
        torch.matmul(a, w, out=out)
        synchronize(out.device)
        times.append(time.perf_counter() - began)
    return 2 * batch * d_in * n_features / statistics.median(times)


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(framework, arch) runs of one repeat, alternating frameworks; a peer shared by two archs runs once."""
    runs: list[tuple[str, str]] = []
    for arch in args.archs:
        for pair in [("ours", arch), *PEERS[arch]]:
            if pair[0] in args.frameworks and pair not in runs:
                runs.append(pair)
    return runs


def run_one(args: argparse.Namespace, framework: str, arch: str, data: Path) -> dict[str, Any]:
    python = sys.executable if framework == "ours" else str(BENCH_PYTHON)
    command = [python, str(HERE / RUNNERS[framework]), "--data", str(data), "--arch", arch,
               "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
               "--batch-size", str(args.batch_size), "--n-features", str(args.n_features), "--k", str(args.k),
               "--lr", repr(args.lr), "--seed", str(args.seed), "--dead-tokens", str(args.dead_tokens),
               "--device", args.device]
    if framework == "ours":
        command += [arg for option in args.ours_option for arg in ("--option", option)]
    if framework == "saelens":
        command += ["--option", f"b_dec_init={args.saelens_b_dec_init}"]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled",
           "SPARSIFY_DISABLE_TRITON": "1" if args.device == "cpu" else "0"}
    load = os.getloadavg()[0]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"[bench] {framework}/{arch} failed (exit {done.returncode}): {shlex.join(command)}\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1])
    result.update(process_wall_s=wall, loadavg_1min_before=load)
    return result


# ---- summary ----------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace, floor: float,
              one_gemm_floor: float) -> dict[str, list[dict[str, Any]]]:
    """Per our arch: one row per framework run in that comparison (medians over repeats)."""
    summary: dict[str, list[dict[str, Any]]] = {}
    for arch in args.archs:
        rows = []
        for framework, peer_arch in [("ours", arch), *PEERS[arch]]:
            mine = [r for r in runs if r["framework"] == framework and r["arch"] == peer_arch]
            if not mine:
                continue
            rates = [r["tokens_per_s"] for r in mine]
            rows.append({
                "framework": framework,
                "framework_version": mine[0]["framework_version"],
                "arch": peer_arch,
                "repeats": len(mine),
                "tokens_per_s": statistics.median(rates),
                "tokens_per_s_min": min(rates),
                "tokens_per_s_max": max(rates),
                "tokens_per_s_total": statistics.median(r["tokens_per_s_total"] for r in mine),
                "init_s": statistics.median(r["init_s"] for r in mine),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                "rss_before_training_mb": max(r["rss_before_training_mb"] for r in mine),
                "fvu_heldout": statistics.median(r["fvu_heldout"] for r in mine),
                "fvu_heldout_all": [r["fvu_heldout"] for r in mine],
                "l0_heldout": statistics.median(r["l0_heldout"] for r in mine),
                "fvu_heldout_batch_mode": _median_or_none(mine, "fvu_heldout_batch_mode"),
                "l0_heldout_batch_mode": _median_or_none(mine, "l0_heldout_batch_mode"),
                "inference_rule": mine[0]["inference_rule"],
                "floor_fraction": statistics.median(rates) / floor,
                "one_gemm_floor_fraction": statistics.median(rates) / one_gemm_floor,
                "threads": mine[0]["threads"],
                "settings": mine[0].get("settings", {}),
            })
        ours = rows[0]["tokens_per_s"] if rows and rows[0]["framework"] == "ours" else None
        for row in rows:
            row["ours_speedup"] = ours / row["tokens_per_s"] if ours else None
        summary[arch] = rows
    return summary


def _median_or_none(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def render(results_path: Path, report: Path, figure: Path | None = None) -> None:
    if not BENCH_PYTHON.exists():
        raise SystemExit(f"{BENCH_PYTHON} is missing: run `bash benchmarks/setup_bench_venv.sh` (or `make bench`).")
    figure = figure or report.parent / "training_throughput.png"
    subprocess.run([str(BENCH_PYTHON), str(HERE / "render_report.py"), str(results_path), "--report", str(report),
                    "--figure", str(figure)], check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results_path = args.out / "results.json"
    if args.render_only:
        render(results_path, args.report, args.figure)
        return 0
    if set(args.frameworks) - {"ours"} and not BENCH_PYTHON.exists():
        raise SystemExit(f"{BENCH_PYTHON} is missing: run `bash benchmarks/setup_bench_venv.sh` (or `make bench`).")
    args.out.mkdir(parents=True, exist_ok=True)
    data = export_data(args)
    pairs = plan(args)
    print(f"[bench] {args.repeats} repeat(s) of {', '.join(f'{f}/{a}' for f, a in pairs)}: {args.steps} steps "
          f"x {args.batch_size} rows, F={args.n_features}, k={args.k}, lr={args.lr:.3g}", file=sys.stderr)
    results: dict[str, Any] = {
        "schema": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "settings": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
        "machine": machine_info(),
        "data": data,
        "gemm": {"shape": [args.batch_size, data["d_in"], args.n_features], "flops_per_s": []},
        "runs": [],
    }
    for repeat in range(args.repeats):
        results["gemm"]["flops_per_s"].append(gemm_flops(args.batch_size, data["d_in"], args.n_features,
                                                         device=args.device))
        for framework, arch in pairs:
            result = run_one(args, framework, arch, args.out / "data")
            result["repeat"] = repeat
            results["runs"].append(result)
            print(f"[bench] repeat {repeat} {framework}/{arch}: {result['tokens_per_s']:,.0f} tokens/s, "
                  f"init {result['init_s']:.1f} s, peak RSS {result['peak_rss_mb']:,.0f} MB, "
                  f"held-out FVU {result['fvu_heldout']:.4f}, L0 {result['l0_heldout']:.1f}", file=sys.stderr)
            atomic_write_json(results_path, results)  # partial results survive a failure
    gemm = statistics.median(results["gemm"]["flops_per_s"])
    floor = gemm / (6 * data["d_in"] * args.n_features)
    one_gemm = gemm / (2 * data["d_in"] * args.n_features)
    results["gemm"].update(median_flops_per_s=gemm, floor_tokens_per_s=floor,
                           floor_formula="GEMM FLOP/s / (6 d F): encoder forward + its two backward GEMMs",
                           one_gemm_floor_tokens_per_s=one_gemm,
                           one_gemm_floor_formula="GEMM FLOP/s / (2 d F): the encoder's forward GEMM alone")
    results["summary"] = summarize(results["runs"], args, floor, one_gemm)
    atomic_write_json(results_path, results)
    print(f"[bench] wrote {results_path}", file=sys.stderr)
    render(results_path, args.report, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
