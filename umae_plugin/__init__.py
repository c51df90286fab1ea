"""umae: U-MAE (Zhang, Wang & Wang, NeurIPS 2022) as a plugin for timm and the official MAE code."""
from .losses import uniformity_loss
from .metrics import effective_rank
from .models_mae import MaskedAutoencoderViT
from .models_umae import UMAEViT
from .models_vit import VisionTransformerClassifier
from .registry import create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "MaskedAutoencoderViT",
    "UMAEViT",
    "VisionTransformerClassifier",
    "create_model",
    "effective_rank",
    "list_models",
    "uniformity_loss",
]
