"""The meta-network: elastic layers, MetaViT, presets and timm interoperability."""

from prance.model.metavit import MODES, MetaViT, TokenReducer
from prance.model.presets import DEFAULT_PRESET, PRESETS, create_model, preset_config
from prance.model.timm_interop import from_timm, load_state_dict_file, timm_kwargs, to_timm_state_dict

__all__ = [
    "MODES",
    "MetaViT",
    "TokenReducer",
    "DEFAULT_PRESET",
    "PRESETS",
    "create_model",
    "preset_config",
    "from_timm",
    "load_state_dict_file",
    "timm_kwargs",
    "to_timm_state_dict",
]
