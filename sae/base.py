"""The SAE module shared by every architecture: encoder, decoder, normalisation (docs/ALGORITHMS.md §0).

Architectures differ only in the selection mask S: z = S * ReLU(a), a = W_enc(x - b_pre) + b_enc,
x_hat = W_dec z + b_pre. Subclasses in sae/architectures/ supply `select_train` (the batch
rule used while training) and `select_inference` (a per-token rule usable on any batch).
Weights use SAELens' layout: W_enc [d_in, F], W_dec [F, d_in] with unit-norm rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae.config import SAEConfig
from sae.distributed import SINGLE_PROCESS, Collectives
from sae.errors import SAEConfigError, SAEDataError
from sae.io import write_folder
from sae.normalization import TokenStats, denormalize, normalize, normalize_grads
from sae.sparse_code import SparseCode, Support, gather_pre_acts, topk_support

GRADS_HINT = "cache activations with gradients (`saewb cache --with-grads`)"


@dataclass
class Selection:
    """What a training-time selection produced (dense reference path), for the losses and thresholds."""

    pre_acts: Tensor
    "a [N, F], with gradient."
    support: Support
    "S in sparse form (what select_train returned)."
    stats: dict[str, Tensor | float] = field(default_factory=dict)
    "Architecture-specific numbers worth logging (device scalars stay tensors: the trainer reads them at log steps)."

    @property
    def mask(self) -> Tensor:
        """S [N, F] bool, no gradient."""
        return self.support.mask()


@dataclass
class SparseSelection:
    """What the sparse training path produced: the code and what the aux loss needs."""

    code: SparseCode
    "z at the support, with gradient."
    pre_acts: Tensor
    "a [N, F] without gradient (select aux latents from it; its gradient flows via gather_pre_acts)."
    encoder_input: Tensor
    "x - b_pre [N, d] (what the pre-activations were computed from): with gradient, or without it when b_pre is set."
    b_pre: Tensor | None = None
    "The decoder bias when encoder_input carries no autograd history: gather_pre_acts gives it its gradient."
    stats: dict[str, Tensor | float] = field(default_factory=dict)
    "Architecture-specific numbers worth logging (device scalars stay tensors: the trainer reads them at log steps)."


class SAE(nn.Module):
    """Sparse autoencoder; `encode` is the inference rule, `encode_train` the training rule."""

    arch: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = "topk"
    "Architecture name this SAE is exported as in SAELens' cfg.json (topk or jumprelu)."
    default_aux_loss: ClassVar[str] = "auxk"
    needs_grads: ClassVar[bool] = False
    "True when training needs per-token LM-loss gradients alongside the activations."
    trainable: ClassVar[bool] = True
    calibration_rule: ClassVar[str | None] = None
    "How sae.calibrate sets the inference thresholds: 'global' (one θ, MC), 'per_latent' (θ_i, FC) or None."
    optional_state: ClassVar[tuple[str, ...]] = ()
    "Buffers added after SAEs of this arch were first saved: a folder without them loads them as initialised."
    collectives: Collectives = SINGLE_PROCESS
    "Reductions over data-parallel ranks, set by the Trainer under torchrun (sae/distributed.py)."

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    norm_scale: Tensor

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__()
        if type(self).arch and cfg.arch != type(self).arch:
            raise SAEConfigError(f"{type(self).__name__} needs arch={type(self).arch!r}, got {cfg.arch!r}.")
        self.validate_config(cfg)
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed)
        # Random unit-norm decoder rows and tied encoder W_enc = W_dec^T (Gao et al., OpenAI code).
        w_dec = torch.randn(cfg.n_features, cfg.d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_features))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("norm_scale", torch.tensor(1.0))
        self.metadata: dict[str, Any] = {}
        "SAELens-style metadata (model_name, hook_name, ...) written into cfg.json."
        self.training_info: dict[str, Any] = {}
        "How this SAE was trained (configs, steps, tokens); written into cfg.json."

    # ---- architecture hooks -------------------------------------------------------------------

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """Reject configs the selection rule cannot use."""
        if cls.trainable and cfg.k is None:
            raise SAEConfigError(f"arch {cls.arch!r} needs k (a positive integer smaller than n_features).")

    def check_batch_size(self, batch_size: int) -> None:
        """Reject batch sizes the training rule cannot use (Feature-Choice needs B >= F/k)."""

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Support, dict[str, Tensor | float]]:
        """Training selection S (sparse, row-major) for pre-activations a (grads: normalised LM gradients), and
        stats to log (return device values as tensors: reading them here would sync every step)."""
        raise NotImplementedError

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        """Inference selection mask: must not depend on which other tokens share the batch."""
        raise NotImplementedError

    def observe(self, code: SparseCode, step: int, total_steps: int) -> None:
        """Update inference state (thresholds) from a step's detached code; default: nothing to learn."""

    # ---- shared maths -------------------------------------------------------------------------

    @property
    def b_pre(self) -> nn.Parameter:
        """Gao et al.'s name for the decoder bias, subtracted from inputs before encoding."""
        return self.b_dec

    def encoder_input(self, x_n: Tensor) -> Tensor:
        """x - b_pre (or x when apply_b_dec_to_input is off), in the normalised space."""
        return x_n - self.b_dec if self.cfg.apply_b_dec_to_input else x_n

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """a = (x - b_pre) W_enc + b_enc, in the normalised space."""
        return self.encoder_input(x_n) @ self.W_enc + self.b_enc

    def decode_normalized(self, z: Tensor) -> Tensor:
        """x_hat = z W_dec + b_pre, in the normalised space (what the training loss sees)."""
        return z @ self.W_dec + self.b_dec

    def normalize(self, x: Tensor, grads: Tensor | None = None) -> tuple[Tensor, Tensor | None, TokenStats]:
        """Raw activations (and LM gradients) -> the SAE's normalised space."""
        self._check_width(x, "activations")
        x = x.to(self.W_enc.dtype)
        x_n, stats = normalize(x, self.cfg.normalization, self.norm_scale)
        g_n = None
        if grads is not None:
            self._check_width(grads, "gradients")
            if grads.shape != x.shape:
                raise SAEDataError(f"gradients have shape {tuple(grads.shape)} but activations {tuple(x.shape)}.")
            g_n = normalize_grads(grads.to(x.dtype), self.cfg.normalization, self.norm_scale, stats)
        return x_n, g_n, stats

    def encode_train(self, x_n: Tensor, grads_n: Tensor | None = None) -> tuple[Tensor, Selection]:
        """Dense reference of the training encoding: z = S * ReLU(a) [N, F] with the batch rule."""
        self._check_grads(grads_n)
        a = self.pre_acts(x_n)
        with torch.no_grad():
            support, stats = self.select_train(a.detach(), grads_n)
        z = torch.where(support.mask(), a.relu(), torch.zeros_like(a))
        return z, Selection(pre_acts=a, support=support, stats=stats)

    def encode_train_sparse(
        self, x_n: Tensor, grads_n: Tensor | None = None, out: Tensor | None = None
    ) -> SparseSelection:
        """Training encoding whose backward touches only the selected latents (see sae/sparse_code.py).

        The dense pre-activations are computed once without autograd (into `out`, a reusable
        [N, F] buffer, when given); gradients reach W_enc, b_enc and b_pre only through the support.
        """
        self._check_grads(grads_n)
        b_pre = None
        if self.cfg.apply_b_dec_to_input and not x_n.requires_grad:  # training: x_n is data, only b_pre learns
            with torch.no_grad():
                x_in = self.encoder_input(x_n)
            b_pre = self.b_dec
        else:
            x_in = self.encoder_input(x_n)
        with torch.no_grad():
            a = torch.addmm(self.b_enc, x_in, self.W_enc, out=out)
            support, stats = self.select_train(a, grads_n)
        values = gather_pre_acts(x_in, self.W_enc, self.b_enc, a, support, b_pre).relu()
        return SparseSelection(SparseCode(support, values), a, x_in, b_pre=b_pre, stats=stats)

    def _check_grads(self, grads_n: Tensor | None) -> None:
        if self.needs_grads and grads_n is None:
            raise SAEDataError(f"arch {self.arch!r} trains on LM-loss gradients: {GRADS_HINT}.")

    # ---- public inference API ------------------------------------------------------------------

    def encode(self, x: Tensor, grads: Tensor | None = None) -> Tensor:
        """Latents [..., F] in inference mode (per-token rule; thresholds for MC/FC)."""
        x2, g2 = _flatten(x), None if grads is None else _flatten(grads)
        x_n, g_n, _ = self.normalize(x2, g2)
        a = self.pre_acts(x_n)
        mask = self.select_inference(a, g_n)
        z = torch.where(mask, a.relu(), torch.zeros_like(a))
        return z.reshape(*x.shape[:-1], -1)

    @torch.no_grad()
    def encode_batch(self, x: Tensor, grads: Tensor | None = None) -> Tensor:
        """Latents with the training (batch) rule, without updating state: MC/FC "batch mode" (§3b)."""
        x_n, g_n, _ = self.normalize(_flatten(x), None if grads is None else _flatten(grads))
        z, _ = self.encode_train(x_n, g_n)
        return z.reshape(*x.shape[:-1], -1)

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction in the original activation space.

        `x` (the encoded inputs) is needed only with per_token_standardize, to undo each token's
        mean and std.
        """
        stats = TokenStats()
        if self.cfg.normalization == "per_token_standardize":
            if x is None:
                raise SAEConfigError("decode() of a per_token_standardize SAE needs x= (the encoded inputs).")
            _, _, stats = self.normalize(_flatten(x))
        y_n = self.decode_normalized(_flatten(z).to(self.W_dec.dtype))
        y = denormalize(y_n, self.cfg.normalization, self.norm_scale, stats)
        return y.reshape(*z.shape[:-1], -1)

    def forward(self, x: Tensor, grads: Tensor | None = None) -> Tensor:
        """Reconstruction of x in the original space (inference rule)."""
        return self.decode(self.encode(x, grads), x)

    def save(self, path: str | Path) -> Path:
        """Write cfg.json + sae_weights.safetensors in SAELens' format (plus our exact extras; sae/io.py)."""
        return write_folder(
            path,
            cfg=self.cfg,
            saelens_architecture=self.saelens_architecture,
            state=self.state_dict(),
            metadata=self.metadata,
            training_info=self.training_info,
        )

    def _check_width(self, t: Tensor, what: str) -> None:
        if t.shape[-1] != self.cfg.d_in:
            raise SAEDataError(
                f"{what} have width {t.shape[-1]} but this SAE has d_in={self.cfg.d_in}."
            )


def _flatten(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Per-row mask of the k largest scores (TopK, Gao et al. 2024 §2.3)."""
    return topk_support(scores, k).mask()


def threshold_mask(pre_acts: Tensor, threshold: Tensor) -> Tensor:
    """JumpReLU gate a > relu(theta), written as SAELens' JumpReLUSAE.encode does."""
    return pre_acts > threshold.relu()


def update_threshold_ema(
    threshold: Tensor, initialized: Tensor, observed: Tensor, valid: Tensor, beta: float
) -> None:
    """theta <- beta*theta + (1-beta)*observed where valid; first observation initialises (§2)."""
    fresh = valid & ~initialized
    ema = beta * threshold + (1 - beta) * observed
    threshold.copy_(torch.where(fresh, observed, torch.where(valid, ema, threshold)))
    initialized |= valid


def threshold_start(cfg: SAEConfig, total_steps: int) -> int:
    """First step updating MC/FC thresholds: configured step, clipped to 10% of the run (our choice)."""
    return min(cfg.threshold_start_step, total_steps // 10)
