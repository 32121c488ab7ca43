"""The training loop shared by every architecture, readable top to bottom (docs/ALGORITHMS.md §0-§5).

One step: normalise -> select (the architecture's rule) -> decode -> loss = NMSE + alpha * aux ->
project decoder gradients -> clip -> Adam -> renormalise decoder rows -> update latent counters
and thresholds. Dead-latent tracking, checkpointing and logging are collaborators.

By default the step runs on sparse kernels (sae/sparse_code.py): after the one dense encoder GEMM,
decoding and every backward touch only the selected latents. `sparse_kernels=False` runs the
plain dense reference of the same maths (the tests hold the two to float64 agreement).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from itertools import islice
from os import PathLike
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae.aux_losses import aux_reconstruction_loss, sparse_aux_loss, zipf_weights
from sae.base import GRADS_HINT, SAE
from sae.batches import BatchStream, batch_reader, make_stream
from sae.calibration import calibrate
from sae.checkpoint import Checkpointer, read_checkpoint, restore_optimizer
from sae.config import FORMAT_VERSION, RUN_ONLY_KEYS, SAEConfig, TrainConfig, config_diff
from sae.distributed import SINGLE_PROCESS, Collectives, centred_sum_of_squares, default_collectives
from sae.errors import SAEConfigError, SAEDataError, SAETrainingError
from sae.feature_tracking import FeatureTracker
from sae.initialization import geometric_median
from sae.normalization import estimate_scale
from sae.registry import get_architecture
from sae.sparse_code import SparseCode, decode_sparse

LogFn = Callable[[int, dict[str, float]], None]


def default_lr(n_features: int) -> float:
    """2e-4 / sqrt(F / 2^14), the dictionary_learning scaling of the learning rate with width."""
    return 2e-4 / math.sqrt(n_features / 2**14)


def lr_at(step: int, total_steps: int, base_lr: float, cfg: TrainConfig) -> float:
    """Linear warmup (<= warmup_max_fraction of the run), flat, then linear decay to 0 (our choice)."""
    warmup = min(cfg.warmup_steps, int(cfg.warmup_max_fraction * total_steps))
    decay_start = total_steps - int(cfg.decay_fraction * total_steps)
    factor = 1.0
    if step < warmup:
        factor = (step + 1) / warmup
    if step >= decay_start:
        factor = min(factor, (total_steps - step) / (total_steps - decay_start))
    return base_lr * factor


@torch.no_grad()
def project_decoder_grads(W_dec: Tensor) -> None:
    """g_i <- g_i - (d_i . g_i) d_i for each unit-norm decoder row d_i (OpenAI sparse_autoencoder)."""
    if W_dec.grad is not None:
        W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec


@torch.no_grad()
def normalize_decoder_rows(W_dec: Tensor) -> None:
    """Put the decoder rows back on the unit sphere after the optimiser step."""
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nmse(x: Tensor, x_hat: Tensor, coll: Collectives = SINGLE_PROCESS) -> Tensor:
    """Per-batch NMSE ||x - x_hat||^2 / ||x - mean_B(x)||^2, Gao et al.'s reconstruction loss.

    Under data parallelism x is this rank's share: the denominator is the global batch's, so the
    ranks' losses sum to the global-batch NMSE.
    """
    return (x - x_hat).pow(2).sum() / centred_sum_of_squares(x, coll)


class TrainLogger:
    """Progress bar (loss, L0, FVU, dead fraction, tokens/s) and the optional log_fn callback."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, cfg: TrainConfig, log_fn: LogFn | None):
        self.total_steps, self.batch_size, self.every, self.log_fn = total_steps, batch_size, cfg.log_every, log_fn
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not cfg.progress, unit="step", desc="sae")
        self.started, self.start_step = time.perf_counter(), start_step

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """`step` counts completed steps (1-based)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics["tokens_per_s"] = (step - self.start_step) * self.batch_size / elapsed
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            L0=f"{metrics['l0']:.1f}",
            FVU=f"{metrics['fvu']:.4f}",
            dead=f"{metrics['dead_frac']:.3f}",
            tok_s=f"{metrics['tokens_per_s']:.0f}",
            refresh=False,
        )
        if self.log_fn is not None and (step % self.every == 0 or step == self.total_steps):
            self.log_fn(step, dict(metrics))

    def close(self) -> None:
        self.bar.close()


class Trainer:
    """Trains one SAE on one batch stream; `run()` returns the trained SAE.

    Data parallel (sae/distributed.py): with `collectives` over W ranks, cfg.batch_size is the global
    batch and `stream` must yield this rank's batch_size / W rows of each global batch.
    """

    def __init__(
        self,
        sae: SAE,
        stream: BatchStream,
        cfg: TrainConfig,
        log_fn: LogFn | None = None,
        collectives: Collectives | None = None,
    ) -> None:
        self.coll = collectives or default_collectives()
        sae.collectives = self.coll
        check_divisible(cfg.batch_size, self.coll.world_size)
        if stream.d_in != sae.cfg.d_in:
            raise SAEDataError(f"activations have width {stream.d_in} but the SAE has d_in={sae.cfg.d_in}.")
        if sae.needs_grads and not stream.has_grads:
            raise SAEDataError(f"arch {sae.arch!r} trains on per-token LM-loss gradients: {GRADS_HINT}.")
        sae.check_batch_size(cfg.batch_size)
        total_tokens = cfg.total_tokens or stream.tokens_per_pass
        if total_tokens is None:
            raise SAEConfigError(
                "total_tokens is required when activations is a one-shot iterator (its length is unknown); "
                "pass total_tokens=... or give a tensor, list or cache."
            )
        self.total_steps = total_tokens // cfg.batch_size
        if self.total_steps < 1:
            raise SAEConfigError(f"total_tokens={total_tokens} is less than one batch (batch_size={cfg.batch_size}).")
        # Resolve every default once, so checkpoints record (and resumes compare) the values used.
        self.lr = cfg.lr or default_lr(sae.cfg.n_features)
        self.k_aux = cfg.k_aux or max(1, sae.cfg.d_in // 2)
        dead_tokens = cfg.dead_tokens or min(10_000_000, max(1, self.total_steps * cfg.batch_size // 5))
        self.cfg = dataclasses.replace(
            cfg,
            total_tokens=self.total_steps * cfg.batch_size,
            lr=self.lr,
            aux_loss=cfg.aux_loss or sae.default_aux_loss,
            k_aux=self.k_aux,
            dead_tokens=dead_tokens,
        )
        self.sae, self.stream, self.log_fn = sae, stream, log_fn
        self.tracker = FeatureTracker(
            sae.cfg.n_features, dead_tokens, cfg.fire_threshold, sae.cfg.density_ema_beta, self.coll
        )
        self.optimizer = torch.optim.Adam(
            [p for _, p in sae.named_parameters()],
            lr=self.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=True,  # one kernel per parameter: ~3x faster than the per-op loop on CPU, same update
        )
        self._pre_acts: Tensor | None = None  # reused [B, F] buffer: no 150 MB allocation per step
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.keep_checkpoints) if cfg.checkpoint_dir else None
        self.step = 0
        if not self.coll.is_main:  # one progress bar and one log for the whole run
            self.cfg = dataclasses.replace(self.cfg, progress=False)
            self.log_fn = None

    def run(self) -> SAE:
        if not self.resume():
            self.initialize()
        logger = TrainLogger(self.total_steps, self.step, self.cfg.batch_size, self.cfg, self.log_fn)
        metrics: dict[str, float] = {}
        try:
            with batch_reader(self.stream, self.step, self.total_steps, self.cfg.prefetch_batches) as batches:
                for step, batch in batches:
                    metrics = self.advance(step, batch, logger)
        finally:
            logger.close()
        self.finish(metrics)
        return self.sae

    def advance(self, step: int, batch: tuple[Tensor, Tensor | None], logger: TrainLogger) -> dict[str, float]:
        """One step of the run: train on the batch, log, and checkpoint when due."""
        metrics = self.train_step(step, *batch)
        self.step = step + 1
        logger.log(self.step, metrics)
        every = self.cfg.checkpoint_every
        due = self.step == self.total_steps or (every and self.step % every == 0)
        if self.checkpointer and self.coll.is_main and due:
            self.save_checkpoint(metrics)
        return metrics

    def finish(self, metrics: dict[str, float]) -> None:
        self.sae.training_info = self.training_info(metrics)
        # The trained SAE is used by one process from here on (rank 0 evaluates it): a batch-mode encode
        # must not wait on ranks that are no longer training.
        self.sae.collectives = SINGLE_PROCESS
        rows = min(self.cfg.calibration_rows, self.stream.tokens_per_pass or self.cfg.total_tokens or 0)
        if self.sae.calibration_rule and rows and self.stream.reiterable and self.coll.is_main:
            # In-sample: the trainer has no held-out data (saewb train recalibrates on its eval cache).
            acts = (x for x, _ in self.stream.batches(0))  # the stream's (acts, grads | None) pairs
            calibrate(self.sae, acts, max_rows=rows, train_batch_size=self.cfg.batch_size,
                      source="training data (in-sample)")

    def losses(self, x_n: Tensor, g_n: Tensor | None) -> tuple[Tensor, Tensor, SparseCode, dict[str, float]]:
        """(reconstruction NMSE, aux loss, code z, selection stats) of one normalised batch."""
        sae = self.sae
        weights = self.aux_weights()
        if self.cfg.sparse_kernels:
            buffer = self._pre_acts
            if buffer is None or buffer.shape != (x_n.shape[0], sae.cfg.n_features) or buffer.dtype != x_n.dtype:
                buffer = self._pre_acts = x_n.new_empty(x_n.shape[0], sae.cfg.n_features)
            sel = sae.encode_train_sparse(x_n, g_n, out=buffer)
            x_hat = decode_sparse(sel.code, sae.W_dec) + sae.b_dec
            residual = (x_n - x_hat).detach()
            aux = x_n.new_zeros(())
            if weights is not None:
                aux = sparse_aux_loss(
                    sel.encoder_input, sae.W_enc, sae.b_enc, sel.pre_acts, residual, sae.W_dec, weights, self.k_aux,
                    self.coll, exclude=sel.code.support,
                )
            return nmse(x_n, x_hat, self.coll), aux, sel.code, sel.stats
        z, selection = sae.encode_train(x_n, g_n)
        x_hat = sae.decode_normalized(z)
        residual = (x_n - x_hat).detach()
        aux = x_n.new_zeros(())
        if weights is not None:
            aux = aux_reconstruction_loss(
                selection.pre_acts, residual, sae.W_dec, weights, self.k_aux, self.coll, exclude=selection.support
            )
        support = selection.support
        return nmse(x_n, x_hat, self.coll), aux, SparseCode(support, z[support.rows, support.cols]), selection.stats

    def train_step(self, step: int, x: Tensor, grads: Tensor | None) -> dict[str, float]:
        """One optimiser step on batch x (and LM gradients); raises before updating on NaN/inf."""
        sae = self.sae
        _check_finite(x, grads, f"step {step} (batch {step} of the stream)")
        x_n, g_n, _ = sae.normalize(x, grads)
        rec, aux, code, stats = self.losses(x_n, g_n)
        loss = rec + self.cfg.aux_coef * aux
        if not torch.isfinite(loss):
            raise SAETrainingError(
                f"the loss became {loss.item()} at step {step} (reconstruction {rec.item()}, aux {aux.item()}); "
                "no update was applied. Lower lr or check the activations' scale."
            )
        lr = lr_at(step, self.total_steps, self.lr, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in sae.parameters() if p.grad is not None]
        for p in params:  # each rank's loss is its share of the global one: sum the gradients
            self.coll.sum_(p.grad)
        project_decoder_grads(sae.W_dec)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise SAETrainingError(f"gradients became non-finite at step {step}; no update was applied.")
        self.optimizer.step()
        normalize_decoder_rows(sae.W_dec)
        code = SparseCode(code.support, code.values.detach())
        self.tracker.update(code)
        sae.observe(code, step, self.total_steps)
        totals = torch.stack([rec.detach(), aux.detach(), code.l0_per_token().sum().to(rec.dtype)])
        rec_total, aux_total, l0_sum = self.coll.sum_(totals).tolist()
        return {
            "loss": rec_total + self.cfg.aux_coef * aux_total,
            "fvu": rec_total,  # batch NMSE in the training space (= batch FVU under scalar norm)
            "aux_loss": aux_total,
            "l0": l0_sum / (x.shape[0] * self.coll.world_size),
            "dead_frac": self.tracker.dead_fraction(),
            "lr": lr,
            "grad_norm": float(grad_norm),
            **stats,
        }

    def aux_weights(self) -> Tensor | None:
        """Per-latent aux weights from the dead/density state before this step: AuxK 1[dead], aux_zipf
        the Zipf deficit (sae/aux_losses.py); None when the run has no aux loss."""
        dead = self.tracker.dead_mask()
        if self.cfg.aux_loss == "auxk":
            return dead.to(self.sae.W_dec.dtype)
        if self.cfg.aux_loss == "aux_zipf":
            weights = zipf_weights(
                self.tracker.density_ema, dead, self.cfg.aux_zipf_head_fraction, self.cfg.aux_zipf_r0,
                self.cfg.aux_zipf_under_use,
            )
            return weights.to(self.sae.W_dec.dtype)
        return None

    @torch.no_grad()
    def initialize(self) -> None:
        """Estimate the scalar normalisation c, then set b_pre to the geometric median (§0)."""
        sae, cfg = self.sae, self.cfg
        gm_batches = math.ceil(cfg.geometric_median_rows / cfg.batch_size)
        norm_batches = min(cfg.norm_estimation_batches, self.total_steps) if sae.cfg.normalization == "scalar" else 0
        if not self.stream.reiterable:  # one-shot data is replayed from memory: read only what b_pre needs
            norm_batches = min(norm_batches, gm_batches)
        n_read = min(max(norm_batches, gm_batches), self.total_steps)
        if self.stream.reiterable:
            first: Iterable[tuple[Tensor, Tensor | None]] = islice(self.stream.batches(0), n_read)
        else:
            first = self.stream.peek(n_read)
        quota = max(1, cfg.geometric_median_rows // self.coll.world_size)  # b_pre sample rows from this rank
        norm_sum, norm_rows, sample, held = 0.0, 0, [], 0
        first_batch: tuple[Tensor, Tensor | None] | None = None
        for j, (x, g) in enumerate(first):
            if first_batch is None:
                first_batch = (x, g)
            _check_finite(x, None, f"batch {j} (read to initialise the normalisation and b_pre)")
            if j < norm_batches:
                norm_sum += float(x.double().norm(dim=1).sum())
                norm_rows += x.shape[0]
            if held < quota:
                sample.append(x[: quota - held])
                held += sample[-1].shape[0]
        if norm_batches:
            totals = self.coll.sum_(torch.tensor([norm_sum, float(norm_rows)], dtype=torch.float64))
            sae.norm_scale.fill_(estimate_scale(float(totals[0]), int(totals[1]), sae.cfg.d_in))
        x_n, _, _ = sae.normalize(self.coll.cat(torch.cat(sample)))
        sae.b_dec.copy_(geometric_median(x_n))
        if cfg.encoder_init_scale:
            self.scale_encoder(first_batch)
        for tensor in [*sae.parameters(), *sae.buffers()]:  # every rank starts from rank 0's exact state
            self.coll.broadcast_(tensor.data)

    @torch.no_grad()
    def scale_encoder(self, batch: tuple[Tensor, Tensor | None] | None) -> None:
        """W_enc <- c * W_enc with c = <x - b_pre, x_hat0 - b_pre> / ||x_hat0 - b_pre||^2 on one training batch.

        At initialisation (b_enc = 0) every selection rule is invariant to a global encoder scale, so c is
        the least-squares best scalar for the first reconstruction. Without it, a batch-level rule
        (Mutual-Choice) gives a few high-norm tokens hundreds of tied-init latents each and starts at
        FVU >> 1. A data-driven variant of OpenAI's optional encoder rescaling (docs/ALGORITHMS.md §0); our choice.
        """
        if batch is None:
            return
        sae = self.sae
        x_n, g_n, _ = sae.normalize(*batch)
        target = x_n - sae.b_dec
        code = sae.encode_train_sparse(x_n, g_n).code
        recon = decode_sparse(code, sae.W_dec)
        sums = self.coll.sum_(torch.stack([(target * recon).sum(), recon.pow(2).sum()]).double())
        if float(sums[1]) > 0 and float(sums[0]) > 0:
            sae.W_enc.mul_(float(sums[0] / sums[1]))

    def resume(self) -> bool:
        """Continue from the newest checkpoint if there is one; the configs must match."""
        latest = self.checkpointer.latest() if self.checkpointer else None
        if latest is None:
            return False
        if not self.cfg.resume:
            raise SAEConfigError(
                f"{self.cfg.checkpoint_dir} already holds checkpoints (newest: {latest.name}); pass resume=True "
                "to continue that run, or choose another checkpoint_dir."
            )
        loaded, tensors, state = read_checkpoint(latest)
        if loaded.cfg.d_in != self.sae.cfg.d_in:
            raise SAEDataError(
                f"activations have width {self.sae.cfg.d_in} but the checkpoint's SAE ({latest}) has "
                f"d_in={loaded.cfg.d_in}."
            )
        diffs = config_diff(state["sae_config"], dataclasses.asdict(self.sae.cfg)) + config_diff(
            _semantic(state["train_config"]), _semantic(dataclasses.asdict(self.cfg))
        )
        if diffs:
            raise SAEConfigError(
                f"cannot resume from {latest}: the configuration differs in {len(diffs)} key(s): "
                + "; ".join(diffs)
                + ". Rerun with the saved settings, or use a new checkpoint_dir."
            )
        self.sae.load_state_dict(loaded.state_dict())
        restore_optimizer(self.sae, self.optimizer, tensors)
        self.tracker.load_state_tensors(
            {k.removeprefix("tracker."): v for k, v in tensors.items() if k.startswith("tracker.")}
        )
        self.step = int(state["step"])
        return True

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        assert self.checkpointer is not None
        self.sae.training_info = self.training_info(metrics)
        state = {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "tokens_seen": self.step * self.cfg.batch_size,
            "total_steps": self.total_steps,
            "sae_config": dataclasses.asdict(self.sae.cfg),
            "train_config": dataclasses.asdict(self.cfg),
        }
        self.checkpointer.save(self.step, self.sae, self.optimizer, self.tracker, state)

    def training_info(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "train_config": dataclasses.asdict(self.cfg),
            "steps": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "last_metrics": {  # JSON has no inf/NaN: a not-yet-learned threshold is recorded as null
                k: v if math.isfinite(v) else None for k, v in metrics.items() if k != "tokens_per_s"
            },
        }


def check_divisible(batch_size: int, world_size: int) -> None:
    """Data parallelism splits each global batch evenly over the ranks."""
    if batch_size % world_size:
        raise SAEConfigError(
            f"batch_size={batch_size} must be a multiple of the number of ranks ({world_size}): each rank "
            f"trains on batch_size / ranks rows of every batch."
        )


def _semantic(train_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_config.items() if k not in RUN_ONLY_KEYS}


def _cache_metadata(cache: Any) -> dict[str, Any]:
    """SAELens metadata a cache can tell: its model and its first hook (the one iter_batches reads)."""
    found: dict[str, Any] = {}
    if isinstance(getattr(cache, "model", None), str):
        found["model_name"] = cache.model
    hooks = getattr(cache, "hooks", None)
    if isinstance(hooks, list) and hooks:
        found["hook_name"] = hooks[0]
    return found


def _check_finite(x: Tensor, grads: Tensor | None, where: str) -> None:
    for name, t in (("activations", x), ("gradients", grads)):
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            row = int(bad.any(dim=1).nonzero()[0, 0])
            raise SAEDataError(
                f"{name} contain NaN/inf at {where}, first in row {row} ({int(bad.sum())} bad values); "
                "nothing was updated with them."
            )


def build_trainer(
    activations: Any,
    *,
    arch: str,
    n_features: int,
    k: int,
    grads: Tensor | None = None,
    batch_size: int = 4096,
    total_tokens: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    log_fn: LogFn | None = None,
    metadata: dict[str, Any] | None = None,
    collectives: Collectives | None = None,
    **options: Any,
) -> Trainer:
    """The Trainer that `train` runs: configs validated, data wrapped as a stream, SAE initialised from `seed`.

    activations: tensor [N, d] (with optional grads [N, d]), an iterable of batches (tensors or
    (acts, grads) pairs), a cache directory path (read with `activations.load_cache`), or a BatchStream
    (several trainers can share one stream, reading each batch once).
    options: any SAEConfig or TrainConfig field (see sae.config), e.g. normalization="none",
    checkpoint_dir=..., progress=False. metadata: SAELens metadata (model_name, hook_name, ...).
    collectives: data-parallel ranks (sae/distributed.py); default: the initialised torch.distributed
    process group when there is one (torchrun), else a single process. batch_size is the global batch.
    """
    cls = get_architecture(arch, trainable=True)
    sae_keys = {f.name for f in dataclasses.fields(SAEConfig)} - {"arch", "d_in", "n_features", "k"}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"batch_size", "total_tokens", "lr", "seed"}
    unknown = sorted(set(options) - sae_keys - train_keys)
    if unknown:
        allowed = ", ".join(sorted(sae_keys | train_keys))
        raise SAEConfigError(f"unknown option(s) {', '.join(unknown)}; allowed: {allowed}.")
    train_cfg = TrainConfig(
        batch_size=batch_size,
        total_tokens=total_tokens,
        lr=lr,
        seed=seed,
        **{key: v for key, v in options.items() if key in train_keys},
    )
    sae_options = {key: v for key, v in options.items() if key in sae_keys}
    cls.validate_config(SAEConfig(arch=arch, d_in=1, n_features=n_features, k=k, **sae_options))  # before any data
    metadata = dict(metadata or {})
    if isinstance(activations, (str, PathLike)):
        import activations as activations_package  # the caching package; imported only for cache paths

        activations = activations_package.load_cache(activations)
    if hasattr(activations, "iter_batches"):
        metadata = {**_cache_metadata(activations), **metadata}
    coll = collectives or default_collectives()
    check_divisible(batch_size, coll.world_size)
    if isinstance(activations, BatchStream):
        stream = activations  # under data parallelism: already this rank's share
    else:
        stream = make_stream(
            activations, grads, batch_size, train_cfg.shuffle, seed, coll.rank, coll.world_size,
            train_cfg.shuffle_buffer_rows,
        )
    sae_cfg = SAEConfig(arch=arch, d_in=stream.d_in, n_features=n_features, k=k, **sae_options)
    sae = cls(sae_cfg, seed=seed)
    sae.metadata = metadata
    return Trainer(sae, stream, train_cfg, log_fn, coll)


def train(
    activations: Any,
    *,
    arch: str,
    n_features: int,
    k: int,
    grads: Tensor | None = None,
    batch_size: int = 4096,
    total_tokens: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    log_fn: LogFn | None = None,
    metadata: dict[str, Any] | None = None,
    collectives: Collectives | None = None,
    **options: Any,
) -> SAE:
    """Train an SAE of architecture `arch` on activations and return it.

    activations: tensor [N, d] (with optional grads [N, d]), an iterable of batches (tensors or
    (acts, grads) pairs), or a cache directory path. total_tokens defaults to one pass. options: any
    SAEConfig or TrainConfig field (see sae.config), e.g. normalization="none", checkpoint_dir=...
    """
    return build_trainer(
        activations,
        arch=arch,
        n_features=n_features,
        k=k,
        grads=grads,
        batch_size=batch_size,
        total_tokens=total_tokens,
        lr=lr,
        seed=seed,
        log_fn=log_fn,
        metadata=metadata,
        collectives=collectives,
        **options,
    ).run()
