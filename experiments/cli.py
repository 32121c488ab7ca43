"""The ``saewb`` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments.arguments import add_dataclass_arguments, dataclass_from_args


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, printed as one line instead of a traceback."""
    from activations import CacheError, CorpusError, HookError, ModelLoadError
    from experiments.analysis import AnalysisError, StoreError
    from experiments.steering import InputError
    from sae.errors import SAEError

    return (CacheError, CorpusError, HookError, ModelLoadError, SAEError, AnalysisError, StoreError, InputError)


def cmd_cache(args: argparse.Namespace) -> int:
    from activations import CacheConfig, build_cache

    cfg = dataclass_from_args(CacheConfig, args)
    build_cache(cfg, progress=not args.quiet)
    return 0


def _train_parser_options(parser: argparse.ArgumentParser) -> None:
    """RunConfig fields, then every SAEConfig/TrainConfig field not already covered, as --flags."""
    from experiments.training import RESERVED, RunConfig
    from sae.config import SAEConfig, TrainConfig

    add_dataclass_arguments(parser, RunConfig, skip=("options",))
    advanced = parser.add_argument_group(
        "SAE and trainer options (see docs/ALGORITHMS.md; 'our choice' marks design choices)"
    )
    for cls in (SAEConfig, TrainConfig):
        add_dataclass_arguments(advanced, cls, skip=tuple(RESERVED), defaults=_none_defaults(cls))


def _none_defaults(cls) -> dict:
    """Advanced options default to None on the command line so only the ones given override the config."""
    import dataclasses

    return {f.name: None for f in dataclasses.fields(cls)}


def _collect_options(args: argparse.Namespace) -> dict:
    import dataclasses

    from experiments.training import RESERVED
    from sae.config import SAEConfig, TrainConfig

    names = {f.name for cls in (SAEConfig, TrainConfig) for f in dataclasses.fields(cls)} - RESERVED
    return {n: getattr(args, n) for n in sorted(names) if getattr(args, n, None) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from experiments.data_parallel import process_group
    from experiments.training import RunConfig, load_run_config

    if args.config:
        cfg = load_run_config(args.config)
    else:
        cfg = dataclass_from_args(RunConfig, args, options=_collect_options(args))
    with process_group():
        return train_with_logging(cfg)


def train_with_logging(cfg) -> int:
    import dataclasses
    import json

    from experiments.training import is_main_process, train_run

    if not is_main_process():  # a data-parallel rank other than 0: train only, rank 0 reports
        train_run(cfg)
        return 0
    if cfg.wandb:
        from experiments.wandb_logging import WandbRun, make_log_fn

        with WandbRun(project=cfg.wandb_project, name=Path(cfg.out).name, config=dataclasses.asdict(cfg)) as run:
            _, metrics = train_run(cfg, log_fn=make_log_fn(run))
            run.summary(metrics)
    else:
        _, metrics = train_run(cfg)
    print(json.dumps(_headline(metrics)))
    return 0


def _headline(metrics: dict) -> dict:
    keys = ("l0", "fvu", "explained_variance", "dead_frac", "dense_frac", "train_tokens", "train_tokens_per_s")
    return {k: metrics[k] for k in keys if k in metrics}


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from experiments.evaluation import evaluate_sae

    result = evaluate_sae(
        sae_dir=args.sae,
        activations_dir=args.activations,
        model_name=args.model,
        dataset=args.dataset,
        tokens=args.tokens,
        max_rows=args.max_rows,
        hook=args.hook,
        zero_ablate_bos=args.zero_ablate_bos,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.6g}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Recalibrate an MC/FC SAE's inference thresholds on cache rows and rewrite its folder."""
    import json

    import activations
    import sae

    model = sae.load(args.sae)
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


def cmd_steer(args: argparse.Namespace) -> int:
    """A scored coefficient sweep: effect, KL, ΔCE and steered text per coefficient."""
    import json
    import time

    from tqdm.auto import tqdm

    import activations
    from experiments.steering import SteeringError, neutral_contexts, parse_features, score_sweep

    started = time.perf_counter()
    model_sae, name, hook = _intervention_inputs(args)
    features = parse_features(args.features, model_sae.cfg.n_features)
    try:
        coefficients = [float(c) for c in args.coefficients.split(",") if c.strip()]
    except ValueError:
        raise SteeringError(f"--coefficients must be comma-separated numbers, got {args.coefficients!r}") from None
    if not 0 < args.new_tokens <= 200:
        raise SteeringError("keep 1 <= --new-tokens <= 200")
    model = activations.load_model(name)
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


def cmd_unlearn(args: argparse.Namespace) -> int:
    """Clamp the most concept-selective features: forgetting against retention cost per clamp size."""
    import json

    import activations
    from experiments.steering import SteeringError, neutral_contexts
    from experiments.unlearning import unlearn_sweep

    model_sae, name, hook = _intervention_inputs(args)
    try:
        sizes = tuple(int(n) for n in args.sizes.split(",") if n.strip())
    except ValueError:
        raise SteeringError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    if not sizes:
        raise SteeringError("give at least one clamp size")
    model = activations.load_model(name)
    neutral = neutral_contexts(model, args.contexts, args.context_length, corpus=args.corpus)
    points = unlearn_sweep(model, model_sae, hook, args.concept, neutral, sizes, args.clamp)
    if args.json:
        print(json.dumps([vars(p) for p in points]))
        return 0
    print(f"concept {args.concept!r} at {hook} of {name}: forgetting = drop of its mean next-token log p; "
          f"cost on {int(neutral.numel())} neutral tokens")
    print(f"{'clamped':>8} {'forgetting':>11} {'KL':>9} {'ΔCE':>9}  features")
    for p in points:
        print(f"{p.n_features:8d} {p.forgetting:11.4f} {p.kl:9.4f} {p.delta_ce:9.4f}  {p.features}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default (see experiments/demo.py)."""
    from experiments.demo import DemoConfig, run_demo

    run_demo(dataclass_from_args(DemoConfig, args))
    return 0


def _add_intervention_arguments(parser: argparse.ArgumentParser) -> None:
    """What `saewb steer` and `saewb unlearn` share: the SAE, its model and hook, and the neutral contexts."""
    parser.add_argument("--sae", required=True, help="SAE folder")
    parser.add_argument("--model", help="model (default: the SAE's own, from cfg.json)")
    parser.add_argument("--hook", help="hook (default: the SAE's own)")
    parser.add_argument("--contexts", type=int, default=8, help="neutral contexts scored (default: 8)")
    parser.add_argument("--context-length", type=int, default=64, help="tokens per neutral context (default: 64)")
    parser.add_argument("--corpus", default="default", help="where the neutral contexts come from (default: default)")


def _intervention_inputs(args: argparse.Namespace):
    """(SAE, model name, hook) for steer/unlearn, checked before the model is loaded."""
    import sae
    from experiments.steering import SteeringError

    model_sae = sae.load(args.sae)
    name = args.model or model_sae.metadata.get("model_name")
    hook = args.hook or model_sae.metadata.get("hook_name")
    if not name or not hook:
        raise SteeringError(f"{args.sae} does not name its model and hook (cfg.json metadata): pass --model and --hook")
    if args.contexts < 1 or args.context_length < 2:
        raise SteeringError("keep --contexts >= 1 and --context-length >= 2")
    return model_sae, name, hook


def build_parser() -> argparse.ArgumentParser:
    from activations import CacheConfig

    parser = argparse.ArgumentParser(
        prog="saewb",
        description="sae-workbench: cache transformer activations, train sparse autoencoders, inspect features. "
        "Everything runs offline on the embedded SmolLM2-135M model and corpus by default.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cache = sub.add_parser(
        "cache",
        help="run a model over a corpus and write a sharded, resumable activation cache",
        description="Run a transformer_lens model over a corpus and write memory-mappable activation shards, "
        "token ids and a manifest. Rerunning the same command resumes after the last complete shard; a "
        "complete cache is not recomputed; a folder holding a different cache is refused.",
    )
    add_dataclass_arguments(cache, CacheConfig, required=("out",))
    cache.add_argument("--hook", dest="hooks", action="append", help="alias of --hooks")
    cache.add_argument("--dataset", dest="corpus", help="alias of --corpus")
    cache.add_argument("--quiet", action="store_true", help="no progress bar")
    cache.set_defaults(func=cmd_cache)

    train = sub.add_parser(
        "train",
        help="train one SAE on an activation cache",
        description="Train a TopK / Mutual-Choice / Feature-Choice / g-SAE on a cache written by `saewb cache`. "
        "The run folder (--out) gets the SAE (loadable by sae.load and SAELens), run_config.json, "
        "train_log.jsonl, eval.json and resumable checkpoints: rerunning the same command resumes. "
        "W&B logging is on by default and goes offline by itself when no API key is configured.",
    )
    train.add_argument("--config", help="a YAML RunConfig (experiments/configs/*.yaml); other flags are ignored")
    _train_parser_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "eval",
        help="metrics of a trained SAE: L0, FVU, dead/dense fractions, and CE/KL with the model in the loop",
        description="Evaluate an SAE folder on an activation cache (FVU against the dataset mean, L0, dead and "
        "dense fractions over the evaluated rows). With --model, also splice the SAE into the model at its hook "
        "and report CE clean / spliced / zero-ablated, CE recovered and KL, on the cache's own contexts or on "
        "--dataset.",
    )
    evaluate.add_argument("--sae", required=True, help="SAE folder (ours or SAELens')")
    evaluate.add_argument("--activations", required=True, help="activation cache folder")
    evaluate.add_argument("--hook", help="hook of a multi-hook cache (default: the SAE's hook_name, else the first)")
    evaluate.add_argument("--max-rows", type=int, default=262_144, help="rows evaluated (default: 262144)")
    evaluate.add_argument("--model", help="model name for CE/KL (e.g. smollm2-135m); omit to skip them")
    evaluate.add_argument("--dataset", help="corpus for CE/KL (default: the cache's own token contexts)")
    evaluate.add_argument("--tokens", type=int, default=8192, help="tokens for CE/KL (default: 8192)")
    evaluate.add_argument(
        "--zero-ablate-bos", action="store_true",
        help="zero BOS positions too in the zero-ablation baseline (SAELens' get_recons_loss convention); by "
        "default only the non-BOS positions the SAE is spliced into are zeroed",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    calibrate = sub.add_parser(
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
    calibrate.add_argument("--sae", required=True, help="MC/FC SAE folder to recalibrate (rewritten in place)")
    calibrate.add_argument("--activations", required=True, help="activation cache to calibrate on")
    calibrate.add_argument("--target-l0", type=float, help="mean active latents per token to reach (default: k)")
    calibrate.add_argument("--rows", type=int, default=131_072, help="rows to use (default: 131072, >= 100k advised)")
    calibrate.add_argument("--skip-rows", type=int, default=0,
                           help="sample only contexts that start after this many cache rows (default: 0)")
    calibrate.add_argument("--hook", help="hook of a multi-hook cache (default: the SAE's hook_name, else the first)")
    calibrate.add_argument("--train-batch-size", type=int,
                           help="FC: batch size its capacities refer to (default: the one it was trained with)")
    calibrate.set_defaults(func=cmd_calibrate)

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
    steer.set_defaults(func=cmd_steer)

    unlearn = sub.add_parser(
        "unlearn",
        help="remove a concept by clamping its most selective SAE features; forgetting against retention cost",
        description="Rank the SAE's features by selectivity for --concept (mean activation on its tokens minus on "
        "neutral contexts of the default corpus), clamp the top 1, 2, 4, 8, 16 (to --clamp, default 0) at every "
        "position at the SAE's hook, and report forgetting (the drop of the concept text's next-token "
        "log-probability) against retention cost (KL(clamped || clean) and the CE change on the neutral contexts).",
    )
    _add_intervention_arguments(unlearn)
    unlearn.add_argument("--concept", required=True, help="text of the concept to forget")
    unlearn.add_argument("--sizes", default="1,2,4,8,16", help="numbers of features to clamp (default: 1,2,4,8,16)")
    unlearn.add_argument("--clamp", type=float, default=0.0, help="value the features are clamped to (default: 0)")
    unlearn.add_argument("--json", action="store_true", help="print a JSON list, one object per clamp size")
    unlearn.set_defaults(func=cmd_unlearn)

    from dashboard.launch import add_dashboard_parser
    from experiments.analysis import add_analyze_parser
    from experiments.sweep import add_sweep_parser

    add_sweep_parser(sub)
    add_analyze_parser(sub)
    add_dashboard_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="the main job on the embedded default model and corpus",
        description="Cache SmolLM2-135M activations (offline) at blocks.6.hook_resid_post, train TopK, "
        "Mutual-Choice, Feature-Choice and g-SAE at equal mean L0, and print the comparison table "
        "(held-out FVU, L0, dead/dense fractions, CE recovered, KL). Finished steps are reused on a rerun.",
    )
    from experiments.demo import DemoConfig

    add_dataclass_arguments(demo, DemoConfig)
    demo.set_defaults(func=cmd_demo)
    return parser


def run_user_command(command: str, func) -> int:
    """Run a command; the user's mistakes become one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return func()
    except KeyboardInterrupt:
        print("saewb: interrupted; rerun the same command to resume from the last complete step", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"saewb {command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from experiments.data_parallel import leave_rank

    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():  # every --out of saewb is a folder
        print(f"saewb {args.command}: error: --out {out} is an existing file; --out names a folder (new or existing)",
              file=sys.stderr)
        return 2
    return leave_rank(run_user_command(args.command, lambda: args.func(args)))


if __name__ == "__main__":
    sys.exit(main())
