"""`saewb calibrate`: set a Mutual-Choice / Feature-Choice SAE's inference thresholds from its final weights."""

from __future__ import annotations

import argparse
import json

import activations
import sae
from activations.devices import DEVICE_HELP
from sae.devices import resolve_device
from sae.hub import hub_name_of


def run(args: argparse.Namespace) -> int:
    """Recalibrate an MC/FC SAE's inference thresholds on cache rows and rewrite its folder."""
    if hub_name_of(args.sae):
        raise sae.SAEConfigError(f"--sae {args.sae} is a hub name; calibrate rewrites a local folder in place: "
                                 "download it (hf download ORG/REPO --local-dir DIR) and pass that folder.")
    model = sae.load(args.sae, device=str(resolve_device(args.device)))
    if not model.calibration_rule:
        raise sae.SAEConfigError(f"{args.sae} is a {model.arch!r} SAE: only mutual_choice and feature_choice SAEs "
                                 "have inference thresholds to calibrate.")
    if args.rows < 1 or args.skip_rows < 0:
        raise sae.SAEConfigError(f"--rows must be >= 1 and --skip-rows >= 0, got {args.rows} and {args.skip_rows}.")
    cache = activations.load_cache(args.activations)
    hook = args.hook or model.metadata.get("hook_name") or cache.hooks[0]
    if hook not in cache.hooks:
        raise activations.CacheError(f"the SAE reads hook {hook!r}, but {args.activations} holds {cache.hooks}")
    if args.skip_rows >= cache.n_tokens:
        raise sae.SAEConfigError(f"--skip-rows {args.skip_rows} leaves no rows of {args.activations} "
                                 f"({cache.n_tokens} rows).")
    rows, n_contexts = cache.spread_rows(args.rows, skip_rows=args.skip_rows, hook=hook)
    record = sae.calibrate(model, rows, target_l0=args.target_l0, max_rows=args.rows,
                           train_batch_size=args.train_batch_size,
                           source=f"{args.activations}: {rows.shape[0]} rows of {n_contexts} contexts spread over "
                                  f"its rows from {args.skip_rows} on")
    model.save(args.sae)
    print(json.dumps(record))
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "calibrate",
        help="set a Mutual-Choice / Feature-Choice SAE's inference thresholds from its final weights",
        description="Recalibrate the inference thresholds of a Mutual-Choice or Feature-Choice SAE on a sample of "
        "--rows rows, whole contexts spread evenly over the cache (thresholds follow the documents of their sample, "
        "so a contiguous slice would fit only its few documents): MC gets one threshold with mean L0 = --target-l0 "
        "(default k) on the sample; FC gets per-latent thresholds so latent i fires on its training share m_i/B of "
        "rows, all shares scaled by one factor s >= target/k until the mean L0 is the target (a latent never fires "
        "on more rows than its pre-activation is positive on). The folder is rewritten in place, file by file "
        "through temp names; cfg.json records the sample, s and the L0 reached. `saewb train` already does this "
        "at the end of every MC/FC run, on its training cache.",
    )
    parser.add_argument("--sae", required=True, help="MC/FC SAE folder to recalibrate (rewritten in place)")
    parser.add_argument("--activations", required=True, help="activation cache to calibrate on")
    parser.add_argument("--target-l0", type=float, help="mean active latents per token to reach (default: k)")
    parser.add_argument("--rows", type=int, default=131_072, help="rows to use (default: 131072, >= 100k advised)")
    parser.add_argument("--skip-rows", type=int, default=0,
                        help="sample only contexts that start after this many cache rows (default: 0)")
    parser.add_argument("--hook", help="hook of a multi-hook cache (default: the SAE's hook_name, else the first)")
    parser.add_argument("--device", default="auto", help=f"where the SAE encodes the sample: {DEVICE_HELP}")
    parser.add_argument("--train-batch-size", type=int,
                        help="FC: batch size its capacities refer to (default: the one it was trained with)")
    parser.set_defaults(func=run)
