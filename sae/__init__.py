"""SAE maths for the workbench: architectures, trainer, metrics, and SAELens-compatible save/load.

    import sae
    model = sae.train(acts, arch="topk", n_features=4096, k=32)
    model.save("out/topk"); same = sae.load("out/topk")
    report = sae.evaluate(same, held_out_acts)
"""

from sae.api import build_trainer, train
from sae.base import SAE
from sae.calibration import calibrate
from sae.config import SAEConfig, TrainConfig, field_help
from sae.errors import SAEConfigError, SAEDataError, SAEError, SAETrainingError
from sae.loading import load_sae as load
from sae.metrics import MetricsAccumulator, ce_loss_recovered, evaluate, kl_score
from sae.registry import ARCHITECTURES, TRAINABLE, get_architecture
from sae.training.schedule import default_lr
from sae.training.trainer import Trainer

__all__ = [
    "ARCHITECTURES",
    "TRAINABLE",
    "SAE",
    "MetricsAccumulator",
    "SAEConfig",
    "SAEConfigError",
    "SAEDataError",
    "SAEError",
    "SAETrainingError",
    "TrainConfig",
    "Trainer",
    "build_trainer",
    "calibrate",
    "default_lr",
    "ce_loss_recovered",
    "evaluate",
    "field_help",
    "get_architecture",
    "kl_score",
    "load",
    "train",
]
