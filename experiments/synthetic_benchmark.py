"""Synthetic benchmark: does each architecture recover a planted sparse dictionary?

    python -m experiments.synthetic_benchmark [--steps 1500] [--seeds 0 1 2] [--runs topk mutual_choice]

Two generators (sae.synthetic): "fixed" gives every sample exactly k atoms, TopK's ideal case;
"variable" draws each sample's atom count uniformly from [min, max] (default 1..2k-1, mean k) and
scales 2% of samples x5, like the few very high-norm tokens of real residual streams, the case
batch-level rules (Mutual-Choice, Feature-Choice) are meant for. Atoms have Zipf(s) frequencies,
coefficients are uniform in [0.5, 1.5], plus small Gaussian noise. Each SAE has as many latents as
there are atoms and k = the (mean) count.

Reported, mean +- std over seeds: mean over atoms of the best cosine with any decoder row (mean max
cosine), the share of atoms recovered at cosine > 0.9 (overall and for the rarest quarter), held-out
FVU, dead fraction, L0 and its std over samples, the Pearson correlation of each held-out sample's
L0 with its norm and (variable) with its true atom count, and (variable) the mean L0 of high-norm
samples over that of the rest: their counts are drawn like the others', so an SAE that codes atoms
gives 1 and one that spends latents on norm gives more. MC/FC are scored with their inference
thresholds (calibrated with sae.calibrate when the library has it, on rows apart from the held-out
ones) and again in batch mode, the training rule at the training batch size. g-SAE needs LM
gradients, which synthetic data has not, so it is left out.

Each run's result is written to <out>/results.json as it finishes, so an interrupted benchmark
resumes where it stopped; <out>/synthetic.md and <out>/synthetic.json hold the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sae as sae_lib
from activations.storage import atomic_write_bytes, atomic_write_json
from sae.base import SAE
from sae.config import config_diff
from sae.synthetic import PlantedData, mean_max_cosine, planted_dictionary_data


@dataclass(frozen=True)
class RunSpec:
    """One benchmark row: an architecture and the SAEConfig/TrainConfig options it trains with."""

    arch: str
    options: dict[str, Any] = field(default_factory=dict)


RUNS: dict[str, RunSpec] = {
    "topk": RunSpec("topk"),
    "mutual_choice": RunSpec("mutual_choice"),
    "feature_choice": RunSpec("feature_choice", {"fc_capacity": "uniform"}),
    "feature_choice+zipf": RunSpec("feature_choice", {"fc_capacity": "zipf"}),
    "mutual_choice+aux_zipf": RunSpec("mutual_choice", {"aux_loss": "aux_zipf"}),
    "topk+aux_zipf": RunSpec("topk", {"aux_loss": "aux_zipf"}),
    "mutual_choice+per_token_standardize": RunSpec("mutual_choice", {"normalization": "per_token_standardize"}),
}
GENERATORS = ("fixed", "variable")
THRESHOLD_ARCHS = tuple(a for a in sae_lib.TRAINABLE if sae_lib.get_architecture(a).calibration_rule)
"""Architectures whose inference rule (thresholds) differs from their training rule (batch selection)."""
LR = 3e-3
HELD_OUT_ROWS = 16384
CALIBRATION_ROWS = 32768
RESULTS_FILE = "results.json"


class ResultsMismatch(ValueError):
    """The results file being resumed was made with other settings."""


@dataclass(frozen=True)
class Settings:
    """What a result depends on besides (generator, run, seed); a resumed benchmark must match it."""

    d: int
    atoms: int
    k: int
    steps: int
    batch_size: int
    zipf: float
    noise: float
    min_atoms: int
    max_atoms: int
    high_norm_fraction: float
    high_norm_scale: float
    lr: float = LR
    held_out_rows: int = HELD_OUT_ROWS
    calibration_rows: int = CALIBRATION_ROWS


def recovery(W_dec: Tensor, dictionary: Tensor, frequencies: Tensor) -> dict[str, float]:
    """Mean max cosine and the share of atoms (all, and the rarest quarter) some decoder row matches at cos > 0.9."""
    learned = W_dec.detach().double()
    learned = learned / learned.norm(dim=1, keepdim=True)
    best = (dictionary.double() @ learned.T).max(dim=1).values
    rare = frequencies.argsort()[: max(1, len(frequencies) // 4)]
    return {
        "mean_max_cosine": mean_max_cosine(W_dec, dictionary),
        "recovered_0.9": float((best > 0.9).double().mean()),
        "rare_recovered_0.9": float((best[rare] > 0.9).double().mean()),
    }


def pearson(a: Tensor, b: Tensor) -> float | None:
    """Pearson correlation in float64; None when either side is constant (e.g. TopK's L0 == k)."""
    a64, b64 = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a64.norm() * b64.norm())
    return float((a64 * b64).sum()) / denom if denom > 1e-12 else None


def make_data(settings: Settings, generator: str, seed: int) -> PlantedData:
    """Training rows, then calibration rows, then held-out rows, from one seeded draw."""
    s = settings
    n = s.steps * s.batch_size + s.calibration_rows + s.held_out_rows
    if generator == "fixed":
        return planted_dictionary_data(n, s.d, s.atoms, s.k, zipf_exponent=s.zipf, noise_std=s.noise, seed=seed)
    return planted_dictionary_data(
        n,
        s.d,
        s.atoms,
        s.k,
        zipf_exponent=s.zipf,
        noise_std=s.noise,
        seed=seed,
        count="variable",
        min_atoms=s.min_atoms,
        max_atoms=s.max_atoms,
        high_norm_fraction=s.high_norm_fraction,
        high_norm_scale=s.high_norm_scale,
    )


@torch.no_grad()
def per_sample_l0(model: SAE, x: Tensor, *, batch_size: int, batch_mode: bool) -> Tensor:
    """[N] active latents per held-out sample, by the inference rule or by the batch rule at batch_size."""
    encode = model.encode_batch if batch_mode else model.encode
    step = batch_size if batch_mode else max(batch_size, 4096)  # the inference rule is per token
    return torch.cat([(encode(x[i : i + step]) > 0).sum(dim=-1) for i in range(0, x.shape[0], step)])


def l0_profile(l0: Tensor, x: Tensor, data: PlantedData, rows: slice, generator: str) -> dict[str, float | None]:
    """How per-sample L0 follows the sample's norm and (variable data) its true atom count."""
    out: dict[str, float | None] = {"corr_l0_norm": pearson(l0, x.norm(dim=1))}
    if generator == "variable":
        assert data.counts is not None and data.high_norm is not None
        out["corr_l0_count"] = pearson(l0, data.counts[rows])
        high = data.high_norm[rows]
        rest_l0 = float(l0[~high].double().mean())
        out["l0_high_norm_ratio"] = float(l0[high].double().mean()) / rest_l0 if high.any() and rest_l0 > 0 else None
    return out


def train_and_score(spec: RunSpec, data: PlantedData, settings: Settings, generator: str, seed: int) -> dict:
    """Train one SAE on the training rows and score it on the held-out rows."""
    s = settings
    n_train = s.steps * s.batch_size
    held_rows = slice(n_train + s.calibration_rows, None)
    train, held_out = data.acts[:n_train], data.acts[held_rows]
    calibrate = getattr(sae_lib, "calibrate", None)
    calibrates = spec.arch in THRESHOLD_ARCHS and calibrate is not None
    # calibrated below on rows of their own: the trainer's in-sample pass on the training rows would be thrown away
    options = {**spec.options, "calibration_rows": 0} if calibrates else spec.options
    started = time.perf_counter()
    model = sae_lib.train(
        train,
        arch=spec.arch,
        n_features=s.atoms,
        k=s.k,
        batch_size=s.batch_size,
        seed=seed,
        lr=s.lr,
        progress=False,
        **options,
    )
    record: dict[str, Any] = {"train_seconds": time.perf_counter() - started, "calibrated": False}
    if calibrates:
        report = calibrate(model, data.acts[n_train : n_train + s.calibration_rows])
        record["calibrated"] = True
        record["calibration"] = {key: v for key, v in report.items() if isinstance(v, (bool, int, float, str))}
    metrics = sae_lib.evaluate(model, held_out)
    record |= recovery(model.W_dec, data.dictionary, data.frequencies)
    record |= {key: metrics[key] for key in ("fvu", "dead_frac", "l0", "l0_std")}
    l0 = per_sample_l0(model, held_out, batch_size=s.batch_size, batch_mode=False)
    record |= l0_profile(l0, held_out, data, held_rows, generator)
    if spec.arch in THRESHOLD_ARCHS:
        batch = sae_lib.evaluate(model, held_out, mode="batch", batch_size=s.batch_size)
        record |= {f"batch_{key}": batch[key] for key in ("fvu", "l0", "l0_std")}
        l0 = per_sample_l0(model, held_out, batch_size=s.batch_size, batch_mode=True)
        record |= {f"batch_{key}": v for key, v in l0_profile(l0, held_out, data, held_rows, generator).items()}
    return record


def run_key(generator: str, label: str, seed: int) -> str:
    return f"{generator}/{label}/{seed}"


def load_results(path: Path, settings: Settings, fresh: bool) -> dict:
    """The results file to resume from, or a new one; raises ResultsMismatch naming the settings that differ."""
    current = dataclasses.asdict(settings)
    if fresh or not path.exists():
        return {"settings": current, "runs": {}}
    results = json.loads(path.read_text())
    changed = config_diff(results["settings"], current)
    if changed:
        raise ResultsMismatch(
            f"{path} holds runs made with other settings ({'; '.join(changed)}); "
            "pass --fresh to discard them or --out to write elsewhere."
        )
    return results


def reusable(record: dict | None, spec: RunSpec) -> bool:
    """A finished run is reused unless sae.calibrate has appeared since an MC/FC run was scored without it."""
    if record is None:
        return False
    wants_calibration = spec.arch in THRESHOLD_ARCHS and getattr(sae_lib, "calibrate", None) is not None
    return record.get("calibrated", False) == wants_calibration


def run_all(
    settings: Settings, generators: list[str], labels: list[str], seeds: list[int], out: Path, fresh: bool = False
) -> dict:
    """Train every (generator, seed, run) not finished yet, saving results.json after each; returns the results."""
    path = out / RESULTS_FILE
    results = load_results(path, settings, fresh)
    total = len(generators) * len(seeds) * len(labels)
    started, trained, done = time.perf_counter(), 0, 0
    for generator in generators:
        for seed in seeds:
            todo = [
                lab for lab in labels if not reusable(results["runs"].get(run_key(generator, lab, seed)), RUNS[lab])
            ]
            done += len(labels) - len(todo)
            if len(todo) < len(labels):
                print(
                    f"[synthetic] {generator} seed {seed}: {len(labels) - len(todo)} finished run(s) reused",
                    file=sys.stderr,
                )
            if not todo:
                continue
            data = make_data(settings, generator, seed)
            for label in todo:
                record = train_and_score(RUNS[label], data, settings, generator, seed)
                results["runs"][run_key(generator, label, seed)] = record
                atomic_write_json(path, results)
                trained, done = trained + 1, done + 1
                elapsed = time.perf_counter() - started
                eta = elapsed / trained * (total - done)
                print(
                    f"[synthetic] {done}/{total} {generator} seed {seed} {label}: "
                    f"cos {record['mean_max_cosine']:.3f}, FVU {record['fvu']:.4f}, L0 {record['l0']:.2f} "
                    f"({record['train_seconds']:.0f} s to train; "
                    f"{elapsed / 60:.1f} min so far, ~{eta / 60:.0f} min left)",
                    file=sys.stderr,
                )
    return results


def summarize(results: dict, generators: list[str], labels: list[str], seeds: list[int]) -> list[dict]:
    """One row per (generator, run): mean and population std over seeds of every numeric metric."""
    rows = []
    for generator in generators:
        for label in labels:
            records = [
                results["runs"][run_key(generator, label, s)]
                for s in seeds
                if run_key(generator, label, s) in results["runs"]
            ]
            if not records:
                continue
            row: dict[str, Any] = {"generator": generator, "run": label, "seeds": len(records)}
            for key in records[0]:
                values = [
                    r[key] for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
                ]
                values = [v for v in values if math.isfinite(v)]
                if key in ("calibrated", "calibration") or not values:
                    continue
                row[key], row[key + "_std"] = statistics.mean(values), statistics.pstdev(values)
            row["calibrated"] = all(r.get("calibrated", False) for r in records)
            rows.append(row)
    return rows


COLUMNS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("mean max cos", "mean_max_cosine", ".3f", GENERATORS),
    ("atoms cos>0.9", "recovered_0.9", ".3f", GENERATORS),
    ("rarest 25% cos>0.9", "rare_recovered_0.9", ".3f", GENERATORS),
    ("FVU", "fvu", ".4f", GENERATORS),
    ("dead", "dead_frac", ".3f", GENERATORS),
    ("L0", "l0", ".2f", GENERATORS),
    ("L0 std", "l0_std", ".2f", GENERATORS),
    ("r(L0, ‖x‖)", "corr_l0_norm", ".2f", GENERATORS),
    ("r(L0, count)", "corr_l0_count", ".2f", ("variable",)),
    ("L0 high-norm ÷ rest", "l0_high_norm_ratio", ".2f", ("variable",)),
    ("batch FVU", "batch_fvu", ".4f", GENERATORS),
    ("batch L0 std", "batch_l0_std", ".2f", GENERATORS),
    ("batch r(L0, ‖x‖)", "batch_corr_l0_norm", ".2f", GENERATORS),
    ("batch r(L0, count)", "batch_corr_l0_count", ".2f", ("variable",)),
    ("batch L0 high-norm ÷ rest", "batch_l0_high_norm_ratio", ".2f", ("variable",)),
)
"""(header, row key, format, generators shown for): the table's columns; "—" where a run has no value."""


def cell(row: dict, key: str, fmt: str) -> str:
    if key not in row:
        return "—"
    return f"{row[key]:{fmt}} ± {row[key + '_std']:{fmt}}"


def table(rows: list[dict], generator: str, settings: Settings) -> str:
    """Markdown table of one generator's rows, headed by what the data were."""
    s = settings
    what = (
        f"exactly k={s.k} atoms per sample"
        if generator == "fixed"
        else f"{s.min_atoms}..{s.max_atoms} atoms per sample (mean {(s.min_atoms + s.max_atoms) / 2:g}), "
        f"{s.high_norm_fraction:.0%} of samples x{s.high_norm_scale:g}"
    )
    columns = [c for c in COLUMNS if generator in c[3]]
    mine = [r for r in rows if r["generator"] == generator]
    seeds = sorted({r["seeds"] for r in mine})
    out = [
        f"## {generator}: {what}",
        "",
        f"d={s.d}, {s.atoms} atoms = latents, k={s.k}, Zipf s={s.zipf:g}, noise {s.noise:g}, {s.steps} steps x "
        f"{s.batch_size}; mean ± std over {'/'.join(map(str, seeds))} seed(s). Batch columns: MC/FC's training "
        "rule at the training batch size; r = Pearson correlation over held-out samples.",
        "",
        "| run | " + " | ".join(c[0] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for r in mine:
        label = r["run"] + ("" if r["calibrated"] or RUNS[r["run"]].arch not in THRESHOLD_ARCHS else " (uncalibrated)")
        out.append(f"| {label} | " + " | ".join(cell(r, key, fmt) for _, key, fmt, _ in columns) + " |")
    return "\n".join(out) + "\n"


def write_report(
    results: dict, settings: Settings, generators: list[str], labels: list[str], seeds: list[int], out: Path
) -> str:
    """Write synthetic.md and synthetic.json under out; returns the markdown."""
    rows = summarize(results, generators, labels, seeds)
    markdown = "\n".join(table(rows, g, settings) for g in generators)
    atomic_write_json(out / "synthetic.json", {"settings": dataclasses.asdict(settings), "rows": rows})
    atomic_write_bytes(out / "synthetic.md", markdown.encode())
    return markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.synthetic_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--d", type=int, default=64, help="activation width (default: 64)")
    parser.add_argument("--atoms", type=int, default=256, help="planted atoms = SAE latents (default: 256)")
    parser.add_argument(
        "--k", type=int, default=8, help="atoms per sample (fixed), their mean (variable) = SAE k (default: 8)"
    )
    parser.add_argument("--steps", type=int, default=1500, help="training steps per run (default: 1500)")
    parser.add_argument(
        "--batch-size", type=int, default=512, help="tokens per step, also batch mode's batch (default: 512)"
    )
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of atom frequencies (default: 1.0)")
    parser.add_argument(
        "--noise", type=float, default=0.01, help="std of the Gaussian noise per dimension (default: 0.01)"
    )
    parser.add_argument(
        "--min-atoms", type=int, default=1, help="variable generator: fewest atoms per sample (default: 1)"
    )
    parser.add_argument(
        "--max-atoms", type=int, help="variable generator: most atoms per sample (default: 2k - 1, mean k)"
    )
    parser.add_argument(
        "--high-norm-fraction",
        type=float,
        default=0.02,
        help="variable generator: share of samples scaled up (default: 0.02)",
    )
    parser.add_argument(
        "--high-norm-scale", type=float, default=5.0, help="variable generator: factor for those samples (default: 5)"
    )
    parser.add_argument(
        "--held-out-rows",
        type=int,
        default=HELD_OUT_ROWS,
        help=f"samples scored per run, rounded up to whole batches (default: {HELD_OUT_ROWS})",
    )
    parser.add_argument(
        "--calibration-rows",
        type=int,
        default=CALIBRATION_ROWS,
        help=f"samples apart from the held-out ones for sae.calibrate on MC/FC (default: {CALIBRATION_ROWS})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument(
        "--generators",
        nargs="+",
        default=list(GENERATORS),
        choices=GENERATORS,
        metavar="GEN",
        help=f"data generators: {', '.join(GENERATORS)} (default: both)",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        choices=list(RUNS),
        metavar="LABEL",
        help=f"run labels: {', '.join(RUNS)} (default: all)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/synthetic"),
        help="folder for results.json (resume state), synthetic.md and synthetic.json (default: runs/synthetic)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="discard finished runs in --out and train everything again"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    max_atoms = 2 * args.k - 1 if args.max_atoms is None else args.max_atoms
    if not 1 <= args.min_atoms <= max_atoms <= args.atoms:
        parser.error(
            f"need 1 <= --min-atoms <= --max-atoms <= --atoms, got {args.min_atoms}, {max_atoms}, {args.atoms}"
        )
    settings = Settings(
        d=args.d,
        atoms=args.atoms,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch_size,
        zipf=args.zipf,
        noise=args.noise,
        min_atoms=args.min_atoms,
        max_atoms=max_atoms,
        high_norm_fraction=args.high_norm_fraction,
        high_norm_scale=args.high_norm_scale,
        held_out_rows=math.ceil(args.held_out_rows / args.batch_size) * args.batch_size,  # whole batches
        calibration_rows=args.calibration_rows,
    )
    labels, generators, seeds = list(dict.fromkeys(args.runs)), list(dict.fromkeys(args.generators)), args.seeds
    try:
        results = run_all(settings, generators, labels, seeds, args.out, fresh=args.fresh)
    except ResultsMismatch as err:
        parser.error(str(err))
    except sae_lib.SAEError as err:  # a typed error names its fix; the runs finished so far stay saved
        print(f"{parser.prog}: error: {err} (finished runs are kept in {args.out / RESULTS_FILE})", file=sys.stderr)
        return 2
    print(write_report(results, settings, generators, labels, seeds, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
