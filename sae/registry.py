"""Architecture name -> SAE class. Adding an architecture = one file + one line here."""

from __future__ import annotations

from sae.architectures.feature_choice import FeatureChoiceSAE
from sae.architectures.gradient_topk import GradientTopKSAE
from sae.architectures.jumprelu import JumpReLUSAE
from sae.architectures.mutual_choice import MutualChoiceSAE
from sae.architectures.relu import ReLUSAE
from sae.architectures.topk import TopKSAE
from sae.base import SAE
from sae.errors import SAEConfigError

ARCHITECTURES: dict[str, type[SAE]] = {
    "topk": TopKSAE,
    "mutual_choice": MutualChoiceSAE,
    "feature_choice": FeatureChoiceSAE,
    "gradient_topk": GradientTopKSAE,
    "jumprelu": JumpReLUSAE,
    "relu": ReLUSAE,
}

TRAINABLE = tuple(name for name, cls in ARCHITECTURES.items() if cls.trainable)


def get_architecture(name: str, *, trainable: bool = False) -> type[SAE]:
    """The SAE class registered under `name`; the error lists what is registered."""
    allowed = TRAINABLE if trainable else tuple(ARCHITECTURES)
    if name not in allowed:
        raise SAEConfigError(f"unknown arch {name!r}; registered architectures: {', '.join(allowed)}.")
    return ARCHITECTURES[name]
