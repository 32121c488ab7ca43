"""Training an SAE, one job per module (import from the modules; this package file imports nothing):

- trainer.py         the loop: Trainer (one step, resume, checkpoint, finish)
- schedule.py        learning rate: default_lr, lr_at
- streams.py         resumable batch streams: ActivationSource, BatchStream, make_stream, rechunk
- prefetch.py        reading a run's batches, optionally ahead in a thread: batch_reader, prefetch
- initialization.py  data-dependent initialisation (docs/ALGORITHMS.md §0): geometric_median, initialize_from_data
- tracking.py        dead-latent counters and densities (FeatureTracker), progress and log_fn (TrainLogger, LogFn)
- checkpoint.py      atomic, resumable checkpoints: Checkpointer, read_checkpoint, config_changes
- finite_guard.py    NaN/inf caught without a host sync per step: screen_batch, FiniteGuard
Data parallelism lives in sae/distributed.py: the selection rules of sae/architectures/ use it too.
"""
