"""`saewb ioi`: an SAE against supervised dictionaries on indirect object identification (Makelov et al. 2024)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import activations
import sae
from activations.devices import DEVICE_HELP
from experiments.ioi import ATTRIBUTES, N_NAMES, POSITIONS, IOIError, IOIResult, check_request, parse_n_latents, run_ioi
from sae.devices import resolve_device


def run(args: argparse.Namespace) -> int:
    """Sufficiency, necessity, control and F1 on IOI prompts at the SAE's hook; a table, or one JSON object."""
    n_latents = parse_n_latents(args.n_latents)
    check_request(args.prompts, args.names, n_latents, args.position)
    device = str(resolve_device(args.device))  # a bad --device is one line before anything is loaded
    model_sae = sae.load(args.sae, device=device)
    name = args.model or model_sae.metadata.get("model_name")
    hook = args.hook or model_sae.metadata.get("hook_name")
    if not name or not hook:
        raise IOIError(f"{args.sae} does not name its model and hook (cfg.json metadata): pass --model and --hook")
    if activations.backend_of_hook(hook) != "transformer_lens":
        raise IOIError(f"saewb ioi reads transformer_lens hooks (blocks.L.hook_resid_post ...); {hook!r} is a module "
                       "of the hf backend")
    if max(n_latents) > model_sae.cfg.n_features:
        raise IOIError(f"--n-latents {max(n_latents)} exceeds the SAE's {model_sae.cfg.n_features} latents")
    model = activations.load_model(name, device=device)
    result = run_ioi(model, model_sae, hook, n_prompts=args.prompts, seed=args.seed, n_latents=n_latents,
                     position=args.position, n_names=args.names, sae_label=f"the SAE {args.sae}")
    if args.json:
        print(json.dumps({"sae": str(args.sae), **dataclasses.asdict(result)}))
        return 0
    print_table(result)
    return 0


def _f(value: float | None, width: int = 8) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.3f}"


def print_table(r: IOIResult) -> None:
    print(f"IOI at {r.hook} ({r.position}) of {r.model}: {r.n_prompts} prompts, {len(r.names)} names, seed {r.seed}")
    print(f"clean logit diff {r.logit_diff_clean:.3f}, accuracy {r.accuracy:.3f}; node mean-ablated: "
          f"{r.logit_diff_mean_ablated:.3f}")
    print(f"{'':12} {'suffic.':>8} {'necess.':>8} {'FVU':>8}   control toward the counterfactual prompt (patch)")
    print(f"{'':12} {'':>8} {'':>8} {'':>8}   " + "  ".join(f"{a:>15}" for a in ATTRIBUTES))

    def cells(entry: dict) -> str:
        return "  ".join(f"{_f(entry[a]['prompt'], 7)} ({_f(entry[a]['patch'], 5).strip():>5})" for a in ATTRIBUTES)

    print(f"{'supervised':12} {_f(r.sufficiency['supervised'])} {_f(r.necessity['supervised'])} "
          f"{_f(r.fvu['supervised'])}   {cells(r.control['supervised'])}")
    print(f"{'sae':12} {_f(r.sufficiency['sae'])} {_f(r.necessity['sae'])} {_f(r.fvu['sae'])}   "
          f"SAE L0 at the node {r.sae_l0:.1f}")
    for n, entry in r.control["sae"].items():
        print(f"{'  sae n=' + n:12} {'':>8} {'':>8} {'':>8}   {cells(entry)}")
    print((f"{'patch':12} {'':>8} {'':>8} {'':>8}   "
           + "  ".join(f"{_f(r.control['patch'][a], 7)} {'':>7}" for a in ATTRIBUTES)).rstrip())
    print("best-latent F1 (mean over values): " + ", ".join(f"{a} {r.f1[a]['mean']:.3f}" for a in ATTRIBUTES))
    if r.sufficiency["sae"] is None:
        other = [p for p in POSITIONS if p != r.position][0]
        print(f"n/a: mean-ablating {r.position} at {r.hook} barely moves the logit diff; try --position {other}")
    print(f"({r.seconds:.0f} s)")


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "ioi",
        help="evaluate an SAE against supervised dictionaries on IOI prompts (Makelov et al. 2024)",
        description="Indirect-object-identification prompts (ABBA/BABA, several templates, names that are single "
        "tokens of the model) and their counterfactuals (IO, S or order changed). At the SAE's hook and one position "
        "(--position: s2, the second S token, or end), compare the SAE with supervised dictionaries (mean + u_IO + "
        "u_S + u_pos, attribute means): sufficiency (splice the reconstruction: fraction of the clean logit diff kept "
        "over mean-ablation), necessity (ablate it, keep the error), control (edit one attribute: supervised "
        "vectors, or at most n SAE latents chosen by F1) as the fraction of the move to the counterfactual's logit "
        "diff, and each attribute value's best-latent F1. docs/ALGORITHMS.md §9.",
    )
    parser.add_argument("--sae", required=True, help="SAE folder")
    parser.add_argument("--model", help="model (default: the SAE's own, from cfg.json)")
    parser.add_argument("--hook", help="hook (default: the SAE's own)")
    parser.add_argument("--prompts", type=int, default=200, help="IOI prompts (default: 200; >= 2 x --names)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and counterfactuals (default: 0)")
    parser.add_argument("--n-latents", default="1,2,4,8",
                        help="SAE latents an edit may change, comma-separated (default: 1,2,4,8)")
    parser.add_argument("--position", default="s2", choices=POSITIONS,
                        help="node position: s2 (the second S token; default) or end (the last token)")
    parser.add_argument("--names", type=int, default=N_NAMES,
                        help=f"single-token names to use, at most (default: {N_NAMES})")
    parser.add_argument("--device", default="auto", help=f"where the SAE and the model run: {DEVICE_HELP}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
