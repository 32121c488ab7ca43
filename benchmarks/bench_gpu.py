"""Training throughput on one GPU at realistic shapes (issue 11): sae-workbench's TopK against the GEMM floor.

    make bench-gpu                                   # = .venv/bin/python benchmarks/bench_gpu.py
    python3 benchmarks/bench_gpu.py --device cuda --out runs/bench-gpu
    python3 benchmarks/bench_gpu.py --device cpu --shapes 16x64x4 --batch-size 64 --steps 3 --repeats 1   # smoke

For each shape d x F x k (default: d=576 and 2304, F=16,384 to 131,072, k=32 and 64) and each precision (fp32, and
bf16 autocast of the encoder GEMM and the decode), in one invocation:

- the GPU's measured GEMM rate at the encoder's shape [batch, d] @ [d, F] in that precision (median of timed
  products after warm-ups), and from it two floors: one GEMM per token (2·d·F FLOPs, what an exact TopK step cannot
  beat) and the dense-encoder floor of the CPU benchmark (6·d·F: the GEMM and its two backward GEMMs);
- our tokens/s over the training loop (initialisation excluded, the device synchronised before and after), the
  median of `--repeats` runs, and the fraction of each floor;
- peak GPU memory (torch.cuda.max_memory_allocated) and the held-out FVU on synthetic data: rows of a planted sparse
  dictionary made on the device (`planted_rows`), so no model or corpus has to travel to the GPU machine;
- side by side in fp32, through make bench's own runners (benchmarks/train_*.py: each framework in its own process,
  the same rows in the same order, one untimed warm-up step, runs alternating, the device synchronised at every
  step mark): ours, SAELens TopK and sparsify TopK with its Triton decoder, with tokens/s, our speed-up, peak GPU
  memory and held-out FVU. The peers run from .venv-bench (`bash benchmarks/setup_bench_venv.sh`; its wheels
  must be installable on the GPU machine); `--peers none` skips them.

Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from bench_protocol import save_data
from bench_training import BENCH_PYTHON, default_dead_tokens, gemm_flops, run_one
from step_syncs import timed_loop

import sae
from activations.storage import atomic_write_bytes, atomic_write_json
from sae.devices import resolve_device
from sae.errors import SAEConfigError

SHAPES = "576x16384x32,576x65536x64,2304x65536x32,2304x131072x64"
PRECISIONS = {"fp32": "none", "bf16": "bf16"}
PEERS = ("saelens", "sparsify")
GENERATION_CHUNK_ROWS = 1024


@torch.no_grad()
def planted_rows(n_rows: int, d: int, n_atoms: int, k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[n_rows, d] rows of a planted sparse dictionary, made on `device`: each row sums k distinct unit-norm atoms
    drawn with Zipf(1) weights by Gumbel-top-k (exact sampling without replacement) with coefficients uniform in
    [0.5, 1.5]. sae.synthetic's generator draws the same model with torch.multinomial, which expands the weights
    to [rows, atoms] float64 on the host: at 131,072 atoms ~0.75 MB and ~6 ms per row on 2 cores, too slow for the
    ~200k rows a side-by-side run reads."""
    g = torch.Generator(device=device).manual_seed(seed)
    dictionary = torch.randn(n_atoms, d, generator=g, device=device)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    log_weights = -torch.arange(1, n_atoms + 1, device=device, dtype=torch.float32).log()
    out = torch.empty(n_rows, d, device=device)
    for start in range(0, n_rows, GENERATION_CHUNK_ROWS):
        m = min(GENERATION_CHUNK_ROWS, n_rows - start)
        gumbel = -(-torch.rand(m, n_atoms, generator=g, device=device).clamp_(min=1e-30).log()).log()  # -log(-log u)
        support = (log_weights + gumbel).topk(k, dim=1).indices
        coefs = 0.5 + torch.rand(m, k, 1, generator=g, device=device)
        out[start:start + m] = (coefs * dictionary[support]).sum(dim=1)
    return out


def timed_run(train: torch.Tensor, d: int, n_features: int, k: int, args: argparse.Namespace, autocast: str):
    """(tokens/s of the training loop, the trained SAE)."""
    trainer = sae.build_trainer(
        train, arch="topk", n_features=n_features, k=k, batch_size=args.batch_size,
        total_tokens=args.steps * args.batch_size, seed=0, progress=False, log_every=max(args.steps, 1),
        device=args.device, autocast=autocast, warmup_steps=0, decay_fraction=0.0, norm_estimation_batches=2,
        geometric_median_rows=min(4096, train.shape[0]),
    )
    seconds, model = timed_loop(trainer)
    return args.steps * args.batch_size / seconds, model


def bench_shape(d: int, n_features: int, k: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = args.batch_size * args.data_batches
    data = planted_rows(rows + args.heldout, d, max(n_features, 4 * k), k, device)
    train, heldout = data[:rows], data[rows:].cpu()
    out = []
    for precision, autocast in PRECISIONS.items():
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rate = gemm_flops(args.batch_size, d, n_features, reps=10, device=device, dtype=dtype, warmups=3)
        speeds, model = [], None
        for _ in range(args.repeats):
            speed, model = timed_run(train, d, n_features, k, args, autocast)
            speeds.append(speed)
        tokens_per_s = statistics.median(speeds)
        fvu = sae.evaluate(model.cpu(), [heldout])["fvu"]
        one_gemm, dense = rate / (2 * d * n_features), rate / (6 * d * n_features)
        out.append({
            "d": d, "n_features": n_features, "k": k, "precision": precision, "gemm_flop_s": rate,
            "tokens_per_s": tokens_per_s, "runs_tokens_per_s": speeds,
            "one_gemm_floor_tokens_per_s": one_gemm, "of_one_gemm_floor": tokens_per_s / one_gemm,
            "dense_floor_tokens_per_s": dense, "of_dense_floor": tokens_per_s / dense,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "heldout_fvu": fvu,
        })
        print(json.dumps(out[-1]), flush=True)
    return out


def side_by_side(d: int, n_features: int, k: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """fp32 TopK of ours and each of args.peers through make bench's runners, alternating, median of --repeats."""
    steps = args.steps + 1  # one untimed warm-up step, as make bench
    folder = Path(args.out) / f"data-{d}x{n_features}x{k}"
    rows = steps * args.batch_size
    data = planted_rows(rows + args.heldout, d, max(n_features, 4 * k), k, device).cpu().numpy()
    save_data(folder, data[:rows], data[rows:])
    del data
    run_args = argparse.Namespace(
        steps=steps, warmup_steps=1, batch_size=args.batch_size, n_features=n_features, k=k,
        lr=sae.default_lr(n_features), seed=0, dead_tokens=default_dead_tokens(rows), ours_option=[],
        saelens_b_dec_init="mean", device=str(device))
    frameworks = ("ours", *args.peers)
    runs: dict[str, list[dict]] = {framework: [] for framework in frameworks}
    for _ in range(args.repeats):
        for framework in frameworks:
            runs[framework].append(run_one(run_args, framework, "topk", folder))
            print(f"[bench-gpu] {d}x{n_features}x{k} {framework}: {runs[framework][-1]['tokens_per_s']:,.0f} tokens/s",
                  file=sys.stderr, flush=True)
    ours = statistics.median(r["tokens_per_s"] for r in runs["ours"])
    out = []
    for framework, mine in runs.items():
        speed = statistics.median(r["tokens_per_s"] for r in mine)
        peaks = [r["peak_gpu_mb"] for r in mine if r.get("peak_gpu_mb") is not None]
        out.append({"d": d, "n_features": n_features, "k": k, "framework": framework,
                    "framework_version": mine[0]["framework_version"], "tokens_per_s": speed,
                    "runs_tokens_per_s": [r["tokens_per_s"] for r in mine], "ours_speedup": ours / speed,
                    "peak_gpu_mb": max(peaks) if peaks else None,
                    "heldout_fvu": statistics.median(r["fvu_heldout"] for r in mine),
                    "decoder_impl": mine[0].get("settings", {}).get("decoder_impl")})
    return out


def markdown(results: list[dict], meta: dict, peers: list[dict] | None = None) -> str:
    lines = [f"GPU benchmark on {meta['device_name']} (torch {meta['torch']}), batch {meta['batch_size']}, "
             f"{meta['steps']} steps, median of {meta['repeats']} run(s); synthetic planted-dictionary rows.", "",
             "| d | F | k | precision | GEMM TFLOP/s | tokens/s | of one-GEMM floor | of dense floor | peak GPU MB "
             "| held-out FVU |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        peak = "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:,.0f}"
        lines.append(f"| {r['d']} | {r['n_features']:,} | {r['k']} | {r['precision']} | {r['gemm_flop_s'] / 1e12:.1f} "
                     f"| {r['tokens_per_s']:,.0f} | {r['of_one_gemm_floor']:.0%} | {r['of_dense_floor']:.0%} | {peak} "
                     f"| {r['heldout_fvu']:.4f} |")
    if peers:
        lines += ["", f"Side by side, fp32 TopK through make bench's runners ({meta['steps']} timed steps after one "
                  "warm-up step, median of the repeats):", "",
                  "| d | F | k | framework | tokens/s | ours × | peak GPU MB | held-out FVU |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in peers:
            peak = "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:,.0f}"
            name = r["framework"] + (f" ({r['decoder_impl']} decoder)" if r["decoder_impl"] else "")
            lines.append(f"| {r['d']} | {r['n_features']:,} | {r['k']} | {name} {r['framework_version']} "
                         f"| {r['tokens_per_s']:,.0f} | {r['ours_speedup']:.2f} | {peak} | {r['heldout_fvu']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or auto (default: cuda)")
    parser.add_argument("--shapes", default=SHAPES, help=f"comma-separated dxFxk (default: {SHAPES})")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per run (default: 50)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per shape and precision (default: 3)")
    parser.add_argument("--data-batches", type=int, default=8, help="distinct batches of rows, cycled (default: 8)")
    parser.add_argument("--heldout", type=int, default=8192, help="held-out rows for the FVU (default: 8192)")
    parser.add_argument("--peers", default=",".join(PEERS) if BENCH_PYTHON.exists() else "none",
                        help="frameworks run side by side with ours, comma-separated from saelens, sparsify, or none "
                             "(default: both when .venv-bench exists, else none)")
    parser.add_argument("--out", default="runs/bench-gpu")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except SAEConfigError as exc:
        parser.error(f"--device: {exc}")
    args.peers = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    if set(args.peers) - set(PEERS):
        parser.error(f"--peers: unknown {sorted(set(args.peers) - set(PEERS))}; choose from {', '.join(PEERS)} "
                     "or none")
    if args.peers and not BENCH_PYTHON.exists():
        parser.error(f"--peers needs {BENCH_PYTHON}: run `bash benchmarks/setup_bench_venv.sh`, or pass --peers none")
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--shapes must be comma-separated dxFxk triples, got {args.shapes!r}")
    if not shapes or any(len(s) != 3 or min(s) < 1 or s[2] > s[1] for s in shapes):
        parser.error(f"--shapes must be comma-separated dxFxk triples with 1 <= k <= F, got {args.shapes!r}")
    results = [r for d, f, k in shapes for r in bench_shape(d, f, k, args, device)]
    peers = [r for d, f, k in shapes for r in side_by_side(d, f, k, args, device)] if args.peers else []
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "CPU", "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
            "repeats": args.repeats}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"meta": meta, "results": results, "side_by_side": peers})
    atomic_write_bytes(out / "results.md", markdown(results, meta, peers).encode())
    print(markdown(results, meta, peers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
