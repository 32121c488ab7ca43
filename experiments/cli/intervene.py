"""`saewb steer` and `saewb unlearn`: interventions at an SAE's hook, each scored for effect against cost."""

from __future__ import annotations

import argparse
import json
import time

from tqdm.auto import tqdm

import activations
import sae
from activations.devices import DEVICE_HELP
from experiments.steering import SteeringError, neutral_contexts, parse_features, score_sweep
from experiments.unlearning import unlearn_sweep
from sae.devices import resolve_device


def run_steer(args: argparse.Namespace) -> int:
    """A scored coefficient sweep: effect, KL, ΔCE and steered text per coefficient."""
    started = time.perf_counter()
    model_sae, name, hook = _intervention_inputs(args)
    features = parse_features(args.features, model_sae.cfg.n_features)
    try:
        coefficients = [float(c) for c in args.coefficients.split(",") if c.strip()]
    except ValueError:
        raise SteeringError(f"--coefficients must be comma-separated numbers, got {args.coefficients!r}") from None
    if not 0 < args.new_tokens <= 200:
        raise SteeringError("keep 1 <= --new-tokens <= 200")
    model = activations.load_model(name, device=str(model_sae.W_enc.device), backend=activations.backend_of_hook(hook))
    neutral = neutral_contexts(model, args.contexts, args.context_length, corpus=args.corpus)
    bars: list = []  # opened at the first step, after the request was checked: an error stays one line

    def on_step(i: int, n: int) -> None:
        if not bars:
            bars.append(tqdm(total=n, desc="steer", unit="step", disable=args.json))
        bars[0].update(i - bars[0].n)

    points = score_sweep(model, model_sae, hook, features, coefficients, args.prompt, neutral, args.new_tokens,
                         on_step=on_step)
    for bar in bars:
        bar.close()
    result = {
        "sae": str(args.sae), "model": name, "hook": hook, "features": features, "prompt": args.prompt,
        "neutral_tokens": int(neutral.numel()), "seconds": round(time.perf_counter() - started, 1),
        "sweep": [vars(p) for p in points],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"features {features} at {hook} of {name}; effect = mean Δ log p(top logit-lens tokens) over "
          f"{result['neutral_tokens']} neutral tokens; cost = KL(steered || clean) and ΔCE")
    print(f"{'coefficient':>12} {'effect':>9} {'KL':>9} {'ΔCE':>9}  continuation of {args.prompt!r}")
    for p in points:
        print(f"{p.coefficient:12.3g} {p.effect:9.4f} {p.kl:9.4f} {p.delta_ce:9.4f}  {p.text!r}")
    return 0


def run_unlearn(args: argparse.Namespace) -> int:
    """Clamp the most concept-selective features: forgetting against retention cost per clamp size."""
    model_sae, name, hook = _intervention_inputs(args)
    try:
        sizes = tuple(int(n) for n in args.sizes.split(",") if n.strip())
    except ValueError:
        raise SteeringError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    if not sizes:
        raise SteeringError("give at least one clamp size")
    if not 0 <= args.generation_tokens <= 200:
        raise SteeringError(f"--generation-tokens must be in 0..200, got {args.generation_tokens}")
    model = activations.load_model(name, device=str(model_sae.W_enc.device), backend=activations.backend_of_hook(hook))
    neutral = neutral_contexts(model, args.contexts, args.context_length, corpus=args.corpus)
    points = unlearn_sweep(model, model_sae, hook, args.concept, neutral, sizes, args.clamp, args.generation_tokens)
    if args.json:
        print(json.dumps([vars(p) for p in points]))
        return 0
    print(f"concept {args.concept!r} at {hook} of {name}: forgetting = drop of its mean next-token log p; "
          f"cost on {int(neutral.numel())} neutral tokens")
    print(f"{'clamped':>8} {'forgetting':>11} {'KL':>9} {'ΔCE':>9} {'contained':>9}  features")
    for p in points:
        contained = "-" if p.contained is None else f"{p.contained:.2f}"
        print(f"{p.n_features:8d} {p.forgetting:11.4f} {p.kl:9.4f} {p.delta_ce:9.4f} {contained:>9}  {p.features}")
    print("contained: share of greedy continuations holding a concept word (- : none, or the concept has no word "
          "that is absent from the neutral contexts)")
    return 0


def _add_intervention_arguments(parser: argparse.ArgumentParser) -> None:
    """What `saewb steer` and `saewb unlearn` share: the SAE, its model and hook, and the neutral contexts."""
    parser.add_argument("--sae", required=True, help="SAE folder, or hf://ORG/REPO[/SUBFOLDER][@REVISION]")
    parser.add_argument("--model", help="model (default: the SAE's own, from cfg.json)")
    parser.add_argument("--hook", help="hook (default: the SAE's own)")
    parser.add_argument("--contexts", type=int, default=8, help="neutral contexts scored (default: 8)")
    parser.add_argument("--context-length", type=int, default=64, help="tokens per neutral context (default: 64)")
    parser.add_argument("--corpus", default="default", help="where the neutral contexts come from (default: default)")
    parser.add_argument("--device", default="auto", help=f"where the SAE and the model run: {DEVICE_HELP}")


def _intervention_inputs(args: argparse.Namespace):
    """(SAE on --device, model name, hook) for steer/unlearn, checked before the model is loaded."""
    model_sae = sae.load(args.sae, device=str(resolve_device(args.device)))
    name = args.model or model_sae.metadata.get("model_name")
    hook = args.hook or model_sae.metadata.get("hook_name")
    if not name or not hook:
        raise SteeringError(f"{args.sae} does not name its model and hook (cfg.json metadata): pass --model and --hook")
    if args.contexts < 1 or args.context_length < 2:
        raise SteeringError("keep --contexts >= 1 and --context-length >= 2")
    return model_sae, name, hook


def add_parsers(sub) -> None:
    steer = sub.add_parser(
        "steer",
        help="score a steering sweep: effect against cost for each coefficient",
        description="Add coefficient x each feature's direction at the SAE's hook and score it on a fixed set of "
        "neutral contexts from the default corpus: effect = mean change of log p(the features' top logit-lens "
        "tokens), cost = KL(steered || clean) and the CE increase per position; plus the steered greedy "
        "continuation of --prompt. Coefficient 0 has zero effect and zero cost.",
    )
    _add_intervention_arguments(steer)
    steer.add_argument("--features", required=True, help="feature ids, comma-separated (e.g. 12 or 12,40)")
    steer.add_argument("--coefficients", required=True, help="raw activation values, comma-separated (e.g. 0,2,4,8)")
    steer.add_argument("--prompt", default="The weather today is", help="prompt for the steered text")
    steer.add_argument("--new-tokens", type=int, default=12, help="tokens of steered text (default: 12)")
    steer.add_argument("--json", action="store_true", help="print one JSON object with a 'sweep' list")
    steer.set_defaults(func=run_steer)

    unlearn = sub.add_parser(
        "unlearn",
        help="remove a concept by clamping its most selective SAE features; forgetting against retention cost",
        description="Rank the SAE's features by selectivity for --concept (mean activation on its tokens minus on "
        "neutral contexts of the default corpus), clamp the top 1, 2, 4, 8, 16 (to --clamp, default 0) at every "
        "position at the SAE's hook, and report forgetting (the drop of the concept text's next-token "
        "log-probability, and how often greedy continuations still contain a concept word) against retention cost "
        "(KL(clamped || clean) and the CE change on the neutral contexts).",
    )
    _add_intervention_arguments(unlearn)
    unlearn.add_argument("--concept", required=True, help="text of the concept to forget")
    unlearn.add_argument("--sizes", default="1,2,4,8,16", help="numbers of features to clamp (default: 1,2,4,8,16)")
    unlearn.add_argument("--clamp", type=float, default=0.0, help="value the features are clamped to (default: 0)")
    unlearn.add_argument("--generation-tokens", type=int, default=16,
                         help="new tokens of each greedy continuation the containment rate reads (0: skip; default 16)"
                         "; prompts: the concept's first half and the starts of 4 neutral contexts")
    unlearn.add_argument("--json", action="store_true", help="print a JSON list, one object per clamp size")
    unlearn.set_defaults(func=run_unlearn)
