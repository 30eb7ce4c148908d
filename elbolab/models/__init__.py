"""Models. Importing this package registers every model (one file each)."""

from elbolab.models import autoencoder, iwae, vae  # noqa: F401  (registration side effect)
from elbolab.models.base import LatentVariableModel, LossOutput, ModelConfig
from elbolab.models.registry import available_models, build_model, get_model_class, register_model

__all__ = [
    "LatentVariableModel", "LossOutput", "ModelConfig", "available_models", "build_model", "get_model_class",
    "register_model",
]
