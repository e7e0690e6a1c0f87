"""PRANCE: per-image adaptive channel widths and token counts for Vision Transformers."""

__version__ = "0.1.0"

from prance.accounting import count_macs, count_params, mac_breakdown, macs_per_sample, params_per_sample
from prance.config import SearchSpace, ViTConfig
from prance.engine import DynamicExecutor
from prance.errors import PranceError
from prance.model import MetaViT, create_model, from_timm, to_timm_state_dict
from prance.pipeline import adapt
from prance.plan import Plan
from prance.policy import StagePolicy, StageState

__all__ = [
    "__version__",
    "DynamicExecutor",
    "MetaViT",
    "Plan",
    "PranceError",
    "SearchSpace",
    "StagePolicy",
    "StageState",
    "ViTConfig",
    "adapt",
    "count_macs",
    "count_params",
    "create_model",
    "from_timm",
    "mac_breakdown",
    "macs_per_sample",
    "params_per_sample",
    "to_timm_state_dict",
]
