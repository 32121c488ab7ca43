"""The training loop shared by every architecture, readable top to bottom (docs/ALGORITHMS.md §0-§5).

One step: normalise -> select (the architecture's rule) -> decode -> loss = NMSE + alpha * aux ->
project decoder gradients -> clip -> Adam -> renormalise decoder rows -> update latent counters
and thresholds. Initialisation (initialization.py), dead-latent tracking and logging (tracking.py),
the LR schedule (schedule.py), batch reading (prefetch.py) and checkpoints (checkpoint.py) are collaborators
in sae/training/; `sae.train` / `sae.build_trainer` (sae/api.py) put a Trainer together.

By default the step runs on sparse kernels (sae/sparse_code.py): after the one dense encoder GEMM,
decoding and every backward touch only the selected latents. `sparse_kernels=False` runs the
plain dense reference of the same maths (the tests hold the two to float64 agreement).

`autocast` runs the encoder GEMM and the decode under torch.autocast (bf16/fp16); the weights, Adam state and
the NMSE stay fp32, and on sparse kernels so does the whole backward (the GEMM runs without autograd).

The step never waits on the device: its metrics stay device tensors (StepMetrics), read on log and checkpoint
steps only, and NaN/inf is recorded and its update skipped on the device (finite_guard.py), then raised at the
next log, before the next checkpoint write, or at the end. With AuxK, while the host knows no latent can be dead
yet (FeatureTracker.may_be_dead) the aux loss, whose candidate search would sync, is skipped: it would be 0.
What still syncs per step: the aux loss once latents may be dead (its candidate count sets tensor shapes),
aux_zipf's weights, and the Mutual-/Feature-Choice selections (data-dependent sizes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae.aux_losses import aux_reconstruction_loss, sparse_aux_loss, zipf_weights
from sae.base import GRADS_HINT, SAE
from sae.calibration import calibrate
from sae.config import FORMAT_VERSION, TrainConfig
from sae.devices import autocast_dtype, resolve_device, to_device
from sae.distributed import SINGLE_PROCESS, Collectives, centred_sum_of_squares, check_divisible, default_collectives
from sae.errors import SAEConfigError, SAEDataError
from sae.sparse_code import SparseCode, decode_sparse
from sae.training.checkpoint import Checkpointer, config_changes, read_checkpoint, restore_optimizer
from sae.training.finite_guard import FiniteGuard, screen_batch
from sae.training.initialization import initialize_from_data
from sae.training.prefetch import batch_reader
from sae.training.schedule import default_lr, lr_at
from sae.training.streams import BatchStream, DeviceStream
from sae.training.tracking import FeatureTracker, LogFn, TrainLogger


@torch.no_grad()
def project_decoder_grads(W_dec: Tensor) -> None:
    """g_i <- g_i - (d_i . g_i) d_i for each unit-norm decoder row d_i (OpenAI sparse_autoencoder): one read of
    both matrices for the row dots, one fused update, no [F, d] temporaries."""
    if W_dec.grad is not None:
        W_dec.grad.addcmul_(torch.linalg.vecdot(W_dec.grad, W_dec).unsqueeze(1), W_dec, value=-1)


@torch.no_grad()
def clip_in_optimizer(optimizer: torch.optim.Optimizer, params: list[Tensor], max_norm: float | None) -> Tensor:
    """The global gradient norm; clipping to max_norm is left to fused Adam, whose grad_scale divides every
    gradient inside its kernel: grad_scale = max(1, (norm + 1e-6) / max_norm), clip_grad_norm_'s factor inverted.
    That saves clip_grad_norm_'s extra pass rescaling every gradient in place (no host sync either way)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm:
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0).float()  # fp32, as the kernel reads
    return norm


@torch.no_grad()
def normalize_decoder_rows(W_dec: Tensor, skip: Tensor | None = None) -> None:
    """Put the decoder rows back on the unit sphere after the optimiser step; where the device flag `skip` is 1
    (Adam skipped the step: finite_guard.py) they stay bit for bit as they are (x / 1.0 == x)."""
    norm = W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    W_dec /= norm if skip is None else torch.where(skip > 0, 1.0, norm)


def nmse(x: Tensor, x_hat: Tensor, coll: Collectives = SINGLE_PROCESS) -> Tensor:
    """Per-batch NMSE ||x - x_hat||^2 / ||x - mean_B(x)||^2, Gao et al.'s reconstruction loss.

    Under data parallelism x is this rank's share: the denominator is the global batch's, so the
    ranks' losses sum to the global-batch NMSE.
    """
    return (x - x_hat).pow(2).sum() / centred_sum_of_squares(x, coll)


@dataclass
class StepMetrics:
    """One step's metrics as the step leaves them: on the device, until Trainer.read_metrics reads them."""

    totals: Tensor
    "[3] reconstruction NMSE, aux loss and selected-and-firing latents, summed over ranks."
    grad_norm: Tensor
    "The global gradient norm before clipping."
    lr: float
    tokens: int
    "Rows of the global batch."
    stats: dict[str, Tensor | float]
    "The architecture's selection stats (sae.base.Selection.stats)."


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
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = autocast_dtype(cfg.autocast, self.device)  # the bf16 check needs the device
        sae.to(self.device)  # before the optimiser is built over its parameters
        if self.device.type != "cpu":
            stream = DeviceStream(stream, self.device)
        self.sae, self.stream, self.log_fn = sae, stream, log_fn
        self.tracker = FeatureTracker(
            sae.cfg.n_features, dead_tokens, cfg.fire_threshold, sae.cfg.density_ema_beta, self.coll, self.device
        )
        self.optimizer = torch.optim.Adam(
            [p for _, p in sae.named_parameters()],
            lr=self.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=True,  # one kernel per parameter: ~3x faster than the per-op loop on CPU, same update
        )
        self.guard = FiniteGuard(self.device)
        # Fused Adam reads found_inf on the device (as under torch's GradScaler): while it is 1.0 the step leaves
        # weights, moments and step counts untouched, with no host branch.
        self.optimizer.found_inf = self.guard.skip
        self.metrics: dict[str, float] = {}
        "The metrics last read (on a log or checkpoint step)."
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
        try:
            with batch_reader(self.stream, self.step, self.total_steps, self.cfg.prefetch_batches) as batches:
                for step, batch in batches:
                    self.advance(step, batch, logger)
        finally:
            logger.close()
        self.finish(self.metrics)
        return self.sae

    def advance(self, step: int, batch: tuple[Tensor, Tensor | None], logger: TrainLogger) -> dict[str, float]:
        """One step of the run: train on the batch; on log and checkpoint steps read its metrics (after the NaN/inf
        check), log them and checkpoint when due. Returns the metrics last read."""
        raw = self.train_step(step, *batch)
        self.step = step + 1
        every = self.cfg.checkpoint_every
        due = self.step == self.total_steps or bool(every and self.step % every == 0)
        save = self.checkpointer is not None and due
        read = save or logger.due(self.step)  # every rank alike, so all raise at the same check
        if read:
            self.metrics = self.read_metrics(raw)
        logger.log(self.step, self.metrics if read else None)
        if save and self.coll.is_main:
            self.save_checkpoint(self.metrics)
        return self.metrics

    def read_metrics(self, raw: StepMetrics) -> dict[str, float]:
        """A step's metrics as numbers, after raise_if_non_finite: the host reads of a log or checkpoint step."""
        self.raise_if_non_finite()
        names = [name for name, value in raw.stats.items() if isinstance(value, Tensor)]
        parts = [raw.totals, raw.grad_norm, self.tracker.dead_fraction(), *(raw.stats[name] for name in names)]
        values = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in parts]).tolist()  # one sync
        rec, aux, fired, grad_norm, dead_frac, *stat_values = values
        self.tracker.refresh_bound()  # a second read, of one int, while the device is idle anyway
        return {
            "loss": rec + self.cfg.aux_coef * aux,
            "fvu": rec,  # batch NMSE in the training space (= batch FVU under scalar norm)
            "aux_loss": aux,
            "l0": fired / raw.tokens,
            "dead_frac": dead_frac,
            "lr": raw.lr,
            "grad_norm": grad_norm,
            **raw.stats,
            **dict(zip(names, stat_values, strict=True)),
        }

    def raise_if_non_finite(self) -> None:
        """Raise naming the first step with NaN/inf (finite_guard.py), if any: a host read, made at every log, before
        every checkpoint write and at the end. The SAE then holds the weights from before that step."""
        first = self.guard.first_bad_step()
        if first is not None:
            completed, self.step = self.step, first
            hint = ""
            if self.cfg.autocast == "fp16":
                hint = " Under autocast fp16, pre-activations beyond fp16's range (65504) become inf: try bf16."
            raise self.guard.error(completed, hint)

    def finish(self, metrics: dict[str, float]) -> None:
        self.raise_if_non_finite()
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

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """torch.autocast to cfg.autocast's dtype on this device, or nothing (autocast none)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def losses(
        self, x_n: Tensor, g_n: Tensor | None
    ) -> tuple[Tensor, Tensor, SparseCode, dict[str, Tensor | float]]:
        """(reconstruction NMSE, aux loss, code z, selection stats) of one normalised batch: encoder GEMM and decode
        under autocast when asked, the NMSE terms on fp32 residuals (so in fp32)."""
        with self.autocast():
            x_hat, aux, code, stats = self._forward(x_n, g_n)
        return nmse(x_n, x_hat.to(x_n.dtype), self.coll), aux.to(x_n.dtype), code, stats

    def _forward(self, x_n: Tensor, g_n: Tensor | None) -> tuple[Tensor, Tensor, SparseCode, dict[str, Tensor | float]]:
        """(x_hat, aux loss, code z, selection stats): the sparse kernels, or the dense reference."""
        sae = self.sae
        weights = self.aux_weights()
        if self.cfg.sparse_kernels:
            buffer = None  # under autocast the GEMM makes a new bf16/fp16 tensor (an fp32 out= would turn it off)
            if self.autocast_dtype is None:
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
                    self.coll, exclude=sel.code.support, b_pre=sel.b_pre,
                )
            return x_hat, aux, sel.code, sel.stats
        z, selection = sae.encode_train(x_n, g_n)
        x_hat = sae.decode_normalized(z)
        residual = (x_n - x_hat).detach()
        aux = x_n.new_zeros(())
        if weights is not None:
            aux = aux_reconstruction_loss(
                selection.pre_acts, residual, sae.W_dec, weights, self.k_aux, self.coll, exclude=selection.support
            )
        support = selection.support
        return x_hat, aux, SparseCode(support, z[support.rows, support.cols]), selection.stats

    def train_step(self, step: int, x: Tensor, grads: Tensor | None) -> StepMetrics:
        """One optimiser step on batch x (and LM gradients) without a host sync: the metrics stay on the device, and
        a NaN/inf batch, loss or gradient norm is recorded by the guard, which skips this update and every later one
        on the device (Trainer.raise_if_non_finite raises at the next log or checkpoint step, or at the end)."""
        sae = self.sae
        x, grads = to_device(x, self.device), to_device(grads, self.device)  # a shared stream's batches (multi_train)
        x, grads, inputs = screen_batch(x, grads)
        x_n, g_n, _ = sae.normalize(x, grads)
        rec, aux, code, stats = self.losses(x_n, g_n)
        loss = rec + self.cfg.aux_coef * aux
        lr = lr_at(step, self.total_steps, self.lr, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in sae.parameters() if p.grad is not None]
        for p in params:  # each rank's loss is its share of the global one: sum the gradients
            self.coll.sum_(p.grad)
        project_decoder_grads(sae.W_dec)
        grad_norm = clip_in_optimizer(self.optimizer, params, self.cfg.grad_clip)
        skip = self.guard.update(step, inputs, loss.detach(), rec.detach(), aux.detach(), grad_norm)
        self.optimizer.step()  # a no-op on the device while skip (its found_inf) is 1.0
        normalize_decoder_rows(sae.W_dec, skip)
        code = SparseCode(code.support, code.values.detach())
        with self.undone_if(skip):
            self.tracker.update(code)
            sae.observe(code, step, self.total_steps)
        totals = torch.stack([rec.detach(), aux.detach(), code.active().sum().to(rec.dtype)])
        return StepMetrics(self.coll.sum_(totals), grad_norm, lr, x.shape[0] * self.coll.world_size, stats)

    @contextlib.contextmanager
    def undone_if(self, skip: Tensor) -> Iterator[None]:
        """Undo on the device what the block changes in the SAE's buffers (thresholds, EMAs) and the latent counters
        where the flag `skip` is 1, so a skipped step changes no state at all. The copies are [F] vectors."""
        state = [*self.sae.buffers(), *self.tracker.state_tensors().values()]
        before = [t.clone() for t in state]
        yield
        with torch.no_grad():
            for t, old in zip(state, before, strict=True):
                t.copy_(torch.where(skip > 0, old, t))

    def aux_weights(self) -> Tensor | None:
        """Per-latent aux weights from the dead/density state before this step: AuxK 1[dead], aux_zipf
        the Zipf deficit (sae/aux_losses.py); None when the run has no aux loss."""
        if self.cfg.aux_loss == "auxk" and not self.tracker.may_be_dead():
            return None  # no latent can be dead yet, so AuxK is 0: skipping it spares its candidate search's sync
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

    def initialize(self) -> None:
        """Estimate the scalar normalisation c, then set b_pre to the geometric median (§0)."""
        initialize_from_data(self.sae, self.stream, self.cfg, self.total_steps, self.coll)

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
        diffs = config_changes(state, self.sae.cfg, self.cfg)
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

