"""Typed configs for an SAE and its training run: one source of truth for defaults and for routing options.

The string under each field is its help text; `field_help(SAEConfig)` returns them for a CLI.
Items marked "our choice" are design decisions from docs/ALGORITHMS.md's UNCONFIRMED list.

Every field declares its role once, in its `_option(role, default, explicit=...)` (the field table):
- "sae": part of the SAE (SAEConfig, saved in cfg.json);
- "train": how the run trains, so a resume must use the same value (TrainConfig);
- "run_only": how this process runs (checkpoints, logging, kernels, prefetch), not the trained result,
  so a resume may change it (TrainConfig);
and `explicit=True` marks the fields `sae.build_trainer` takes as named arguments (arch, n_features, k,
batch_size, total_tokens, lr, seed) or derives (d_in) rather than as **options; `shared=True` the fields that
decide the batches a run reads (several SAEs trained on one stream must agree on them). Routers read the table
through `fields_with_role`, `option_roles` and `shared_stream_fields`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
from dataclasses import dataclass
from typing import Any

from sae.devices import AUTOCAST_DTYPES, check_device_spec
from sae.errors import SAEConfigError

FORMAT_VERSION = 1
"""Version of the workbench keys written into cfg.json and checkpoints; bump on layout changes."""

NORMALIZATIONS = ("scalar", "per_token_standardize", "none")
FC_CAPACITIES = ("uniform", "zipf")
AUX_LOSSES = ("auxk", "aux_zipf", "none")

ROLES = ("sae", "train", "run_only")
"""Roles of config fields; see the module docstring."""
ROLE = "role"
EXPLICIT = "explicit"
SHARED_STREAM = "shared_stream"
"""Keys of a field's metadata: its role, whether build_trainer takes it as a named argument, and whether it decides
the batches a run reads (runs trained together on one activation stream must agree on it; RunConfig marks its own
such fields, activations and hook, with the same key)."""


def _option(role: str, default: Any = dataclasses.MISSING, *, explicit: bool = False, shared: bool = False) -> Any:
    """A config field with its role (explicit and shared-stream flags) in its metadata; `default` as
    dataclasses.field's."""
    if role not in ROLES:
        raise ValueError(f"unknown field role {role!r}; roles: {', '.join(ROLES)}.")
    return dataclasses.field(default=default, metadata={ROLE: role, EXPLICIT: explicit, SHARED_STREAM: shared})


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE and run its selection rule (saved in cfg.json)."""

    arch: str = _option("sae", explicit=True)
    "Architecture name from sae.registry: topk, mutual_choice, feature_choice, gradient_topk."
    d_in: int = _option("sae", explicit=True)
    "Width of the activation vectors."
    n_features: int = _option("sae", explicit=True)
    "Number of latents F."
    k: int | None = _option("sae", None, explicit=True)
    "Active latents per token (TopK, g-SAE), mean per token (Mutual-Choice), or k*B/F per feature (FC)."
    normalization: str = _option("sae", "scalar")
    "Input normalisation stored with the SAE: scalar (c = sqrt(d)/E||x||), per_token_standardize, none."
    apply_b_dec_to_input: bool = _option("sae", True)
    "Subtract b_dec (b_pre) before encoding, as in Gao et al.; False only for SAELens SAEs saved that way."
    inference_k: int | None = _option("sae", None)
    "TopK/g-SAE: latents kept per token at inference (Makhzani & Frey's alpha*k); None means k."
    threshold_beta: float = _option("sae", 0.999)
    "MC/FC: EMA factor of the inference threshold(s), theta <- beta*theta + (1-beta)*min selected."
    threshold_start_step: int = _option("sae", 1000)
    "MC/FC: first step that updates the threshold; clipped to 10% of the run's steps (our choice)."
    fc_capacity: str = _option("sae", "zipf")
    "Feature-Choice capacities: zipf (m_i ~ (demand rank + r0)^-s, >= 1; our choice, see README) or uniform (k*B/F)."
    fc_zipf_s: float = _option("sae", 1.0)
    "FC zipf capacities: exponent s (our default; fit it to a trained TopK/MC density curve)."
    fc_zipf_r0: float = _option("sae", 0.0)
    "FC zipf capacities: rank offset r0 added to the 1-based density rank (our default)."
    density_ema_beta: float = _option("sae", 0.99)
    "EMA factor of per-latent firing rates, used for FC zipf ranks and aux_zipf (our choice)."
    grad_beta: float = _option("sae", 1.0)
    "g-SAE: weight beta of the gradient term in s = z + beta * z * |h| (our default)."
    grad_rms_normalize: bool = _option("sae", True)
    "g-SAE: divide h = W_dec g by its per-token RMS so beta is scale-free (our choice)."

    def __post_init__(self) -> None:
        require_finite_floats(self)
        _require_positive_int("d_in", self.d_in)
        _require_positive_int("n_features", self.n_features)
        if self.k is not None:
            _require_positive_int("k", self.k)
            if self.k >= self.n_features:
                raise SAEConfigError(
                    f"k={self.k} must be smaller than n_features={self.n_features} "
                    "(a sparse code keeps fewer latents than it has)."
                )
        if self.inference_k is not None:
            _require_positive_int("inference_k", self.inference_k)
            if self.inference_k > self.n_features:
                raise SAEConfigError(
                    f"inference_k={self.inference_k} must be at most n_features={self.n_features}."
                )
        _require_choice("normalization", self.normalization, NORMALIZATIONS)
        _require_choice("fc_capacity", self.fc_capacity, FC_CAPACITIES)
        _require_fraction("threshold_beta", self.threshold_beta)
        _require_fraction("density_ema_beta", self.density_ema_beta)
        if self.threshold_start_step < 0:
            raise SAEConfigError(f"threshold_start_step must be >= 0, got {self.threshold_start_step}.")
        if self.fc_zipf_s <= 0:
            raise SAEConfigError(f"fc_zipf_s must be > 0, got {self.fc_zipf_s}.")
        if self.fc_zipf_r0 < 0:
            raise SAEConfigError(f"fc_zipf_r0 must be >= 0, got {self.fc_zipf_r0}.")
        if self.grad_beta < 0:
            raise SAEConfigError(f"grad_beta must be >= 0, got {self.grad_beta}.")


@dataclass
class TrainConfig:
    """How one training run goes: optimiser, schedule, aux loss, dead tracking, checkpoints."""

    batch_size: int = _option("train", 4096, explicit=True, shared=True)
    "Tokens per step B."
    total_tokens: int | None = _option("train", None, explicit=True, shared=True)
    "Tokens to train on; None means one pass over the data."
    lr: float | None = _option("train", None, explicit=True)
    "Adam learning rate; None means 2e-4 / sqrt(F / 2^14) (dictionary_learning's scaling)."
    adam_beta1: float = _option("train", 0.9)
    "Adam beta1 (OpenAI config)."
    adam_beta2: float = _option("train", 0.999)
    "Adam beta2 (OpenAI config)."
    adam_eps: float = _option("train", 6.25e-10)
    "Adam epsilon (OpenAI config)."
    warmup_steps: int = _option("train", 1000)
    "Linear LR warmup steps; clipped to warmup_max_fraction of the run."
    warmup_max_fraction: float = _option("train", 0.1)
    "Upper bound on warmup as a fraction of total steps (our choice)."
    decay_fraction: float = _option("train", 0.2)
    "Linear decay of the LR to 0 over this final fraction of steps (our choice)."
    grad_clip: float = _option("train", 1.0)
    "Clip the global gradient norm to this value (dictionary_learning); 0 disables."
    seed: int = _option("train", 0, explicit=True, shared=True)
    "Seed for the initial weights and the data order."
    shuffle: bool = _option("train", True, shared=True)
    "Shuffle tensors and caches each pass (seeded); plain iterables keep their own order."
    shuffle_buffer_rows: int | None = _option("train", None, shared=True)
    "Rows mixed at once when shuffling a cache (None: the reader's 262,144); reading memory is rows x d x 4 bytes."
    aux_loss: str | None = _option("train", None)
    "auxk, aux_zipf or none; None means the architecture's default (AuxK, or none for FC)."
    aux_coef: float = _option("train", 1 / 32)
    "Coefficient alpha of the auxiliary loss (Gao et al.)."
    k_aux: int | None = _option("train", None)
    "Latents used by the aux loss; None means d_in // 2 (Gao App. B.1); clamped to the candidates."
    aux_zipf_head_fraction: float = _option("train", 0.8)
    "aux_zipf: fit the Zipf law on density ranks <= this fraction of F (our choice)."
    aux_zipf_r0: float = _option("train", 0.0)
    "aux_zipf: rank offset r0 in log p = c - s*log(r + r0), 1-based ranks (our choice)."
    aux_zipf_under_use: float = _option("train", 0.5)
    "aux_zipf: a live latent is a candidate only if its density is <= this fraction of the fitted curve (our choice)."
    dead_tokens: int | None = _option("train", None)
    "A latent is dead after this many tokens without firing; None means min(10M, 20% of the run)."
    fire_threshold: float = _option("train", 0.0)
    "A latent fires on a token when z > this (OpenAI uses 1e-3)."
    norm_estimation_batches: int = _option("train", 1000)
    "Batches used to estimate the scalar normalisation c (capped at the run's steps)."
    geometric_median_rows: int = _option("train", 32768)
    "Rows used for the geometric-median initialisation of b_pre."
    encoder_init_scale: bool = _option("train", True)
    "Scale the initial encoder so the first batch's reconstruction has the least-squares best size (our choice)."
    checkpoint_dir: str | None = _option("run_only", None)
    "Directory for checkpoints; None disables checkpointing."
    checkpoint_every: int | None = _option("run_only", None)
    "Write a checkpoint every N steps (and always at the end) when checkpoint_dir is set."
    keep_checkpoints: int = _option("run_only", 2)
    "How many of the newest checkpoints to keep."
    resume: bool = _option("run_only", True)
    "Resume from the newest checkpoint in checkpoint_dir when one exists."
    log_every: int = _option("run_only", 100)
    (
        "Call log_fn every N steps (and at the last step). Only then, and before each checkpoint, does the host read "
        "the step's metrics and NaN/inf flags from the device (a GPU sync); other steps never wait on the device."
    )
    progress: bool = _option("run_only", True)
    "Show a tqdm progress bar (loss, L0, FVU, dead fraction, tokens/s: refreshed every log_every steps)."
    sparse_kernels: bool = _option("run_only", True)
    "Decode and backpropagate through the selected latents only (fast); False runs the dense reference."
    calibration_rows: int = _option("train", 131_072)
    "MC/FC: training rows used to calibrate the inference thresholds at the end (0 keeps the EMA thresholds)."
    prefetch_batches: int | None = _option("run_only", None)
    "Batches read ahead by a background thread; None: 2 when a core is free beyond torch's threads, else 0."
    device: str = _option("run_only", "auto")
    "Where the SAE and optimiser live: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
    autocast: str = _option("run_only", "none")
    (
        "Mixed precision (torch.autocast) for the encoder GEMM and the decode: none, bf16 or fp16; weights, Adam "
        "state and the loss stay fp32. none is the default on every device: on CPU bf16 measured ~4x slower than "
        "fp32; on CUDA it is opt-in because it changes the numbers (latents are selected on bf16 pre-activations). "
        "On a GPU use bf16 (compute capability 8.0+). fp16 needs sparse_kernels: their backward stays fp32, so no "
        "loss scaling is needed."
    )

    def __post_init__(self) -> None:
        require_finite_floats(self)
        _require_positive_int("batch_size", self.batch_size)
        if self.total_tokens is not None:
            _require_positive_int("total_tokens", self.total_tokens)
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise SAEConfigError(f"lr must be a positive number, got {self.lr!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            _require_fraction(name, getattr(self, name))
        if self.adam_eps <= 0:
            raise SAEConfigError(f"adam_eps must be > 0, got {self.adam_eps}.")
        if self.warmup_steps < 0:
            raise SAEConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        for name in ("warmup_max_fraction", "decay_fraction", "aux_zipf_head_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise SAEConfigError(f"{name} must be in [0, 1], got {value}.")
        if not 0 < self.aux_zipf_under_use <= 1:
            raise SAEConfigError(f"aux_zipf_under_use must be in (0, 1], got {self.aux_zipf_under_use}.")
        if self.grad_clip < 0:
            raise SAEConfigError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}.")
        if self.aux_loss is not None:
            _require_choice("aux_loss", self.aux_loss, AUX_LOSSES)
        if self.aux_coef < 0:
            raise SAEConfigError(f"aux_coef must be >= 0, got {self.aux_coef}.")
        if self.fire_threshold < 0:
            raise SAEConfigError(f"fire_threshold must be >= 0, got {self.fire_threshold}.")
        for name in ("k_aux", "dead_tokens", "checkpoint_every", "shuffle_buffer_rows"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        if self.prefetch_batches is not None:
            require_nonnegative_int("prefetch_batches", self.prefetch_batches)
        check_device_spec(self.device)
        _require_choice("autocast", self.autocast, tuple(AUTOCAST_DTYPES))
        if self.autocast == "fp16" and not self.sparse_kernels:
            raise SAEConfigError(
                "autocast fp16 needs sparse_kernels=True: the dense reference path backpropagates through fp16 "
                "GEMMs, whose small gradients underflow without loss scaling (this trainer has no GradScaler); "
                "with sparse_kernels=False use autocast bf16 or none."
            )
        require_nonnegative_int("calibration_rows", self.calibration_rows, " (0 disables)")
        for name in ("norm_estimation_batches", "geometric_median_rows", "keep_checkpoints", "log_every"):
            _require_positive_int(name, getattr(self, name))


CONFIG_CLASSES = (SAEConfig, TrainConfig)


def option_roles() -> dict[str, str]:
    """Field name -> role for every SAEConfig and TrainConfig field, in declaration order."""
    return {f.name: f.metadata[ROLE] for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)}


def fields_with_role(*roles: str, explicit: bool | None = None) -> frozenset[str]:
    """Names of the SAEConfig/TrainConfig fields with one of `roles` (all roles when none are given).

    explicit=False keeps only what build_trainer takes as **options, True only its named arguments
    (and d_in), None both. E.g. fields_with_role("run_only") is what a resume may change.
    """
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown field role(s) {', '.join(unknown)}; roles: {', '.join(ROLES)}.")
    wanted = set(roles or ROLES)
    return frozenset(
        f.name
        for cls in CONFIG_CLASSES
        for f in dataclasses.fields(cls)
        if f.metadata[ROLE] in wanted and (explicit is None or f.metadata[EXPLICIT] == explicit)
    )


def shared_stream_fields(cls: type) -> tuple[str, ...]:
    """The fields of dataclass `cls` that decide the batches a run reads, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(SHARED_STREAM))


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Lines 'key: saved -> current' for every key whose value differs (resume safety check)."""
    keys = sorted(set(saved) | set(current))
    missing = object()
    return [
        f"{key}: {saved.get(key, missing)!r} -> {current.get(key, missing)!r}".replace(
            repr(missing), "<absent>"
        )
        for key in keys
        if saved.get(key, missing) != current.get(key, missing)
    ]


def field_help(cls: type) -> dict[str, str]:
    """Help text per dataclass field, for `--help`: the string under the field, or metadata["help"]."""
    helps: dict[str, str] = {}
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError):  # no source available (e.g. a class built at run time)
        body = []
    for stmt, following in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            helps[stmt.target.id] = following.value.value
    return {f.name: f.metadata.get("help", helps.get(f.name, "")) for f in dataclasses.fields(cls)}


def require_finite_floats(config: object) -> None:
    """Every float field is a finite number: NaN passes `<= 0` checks, so this runs before the range checks."""
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SAEConfigError(f"{f.name} must be a finite number, got {value!r}.")


def require_nonnegative_int(name: str, value: object, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SAEConfigError(f"{name} must be an integer >= 0{note}, got {value!r}.")


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEConfigError(f"{name} must be a positive integer, got {value!r}.")


def _require_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise SAEConfigError(f"{name} must be in [0, 1), got {value}.")


def _require_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SAEConfigError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}.")
