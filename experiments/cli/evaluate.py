"""`saewb eval`: metrics of a trained SAE, and CE/KL with the model in the loop."""

from __future__ import annotations

import argparse
import json

from activations.devices import DEVICE_HELP
from experiments.evaluation import evaluate_sae


def run(args: argparse.Namespace) -> int:
    result = evaluate_sae(
        sae_dir=args.sae,
        activations_dir=args.activations,
        model_name=args.model,
        dataset=args.dataset,
        tokens=args.tokens,
        max_rows=args.max_rows,
        hook=args.hook,
        zero_ablate_bos=args.zero_ablate_bos,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.6g}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "eval",
        help="metrics of a trained SAE: L0, FVU, dead/dense fractions, and CE/KL with the model in the loop",
        description="Evaluate an SAE folder on an activation cache (FVU against the dataset mean, L0, dead and "
        "dense fractions over the evaluated rows). With --model, also splice the SAE into the model at its hook "
        "and report CE clean / spliced / zero-ablated, CE recovered and KL, on the cache's own contexts or on "
        "--dataset.",
    )
    parser.add_argument("--sae", required=True,
                        help="SAE folder (ours or SAELens'), or hf://ORG/REPO[/SUBFOLDER][@REVISION]")
    parser.add_argument("--activations", required=True, help="activation cache folder")
    parser.add_argument("--hook", help="hook of a multi-hook cache (default: the SAE's hook_name, else the first)")
    parser.add_argument("--max-rows", type=int, default=262_144, help="rows evaluated (default: 262144)")
    parser.add_argument("--model", help="model name for CE/KL (e.g. smollm2-135m); omit to skip them")
    parser.add_argument("--dataset", help="corpus for CE/KL (default: the cache's own token contexts)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens for CE/KL (default: 8192)")
    parser.add_argument(
        "--zero-ablate-bos", action="store_true",
        help="zero BOS positions too in the zero-ablation baseline (SAELens' get_recons_loss convention); by "
        "default only the non-BOS positions the SAE is spliced into are zeroed",
    )
    parser.add_argument("--device", default="auto", help=f"where the SAE and the model run: {DEVICE_HELP}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
