"""Token optimisation: importance, prune / merge / reduce (physical and masked), static baselines."""

from prance.tokens.baselines import EViTReducer, Reducer, ToMeReducer
from prance.tokens.ops import (
    attention_importance,
    bipartite_soft_matching,
    cls_importance,
    merge,
    merge_macs,
    merge_masked,
    merge_source,
    merge_state,
    merge_weighted,
    prune,
    prune_masked,
    reduce,
    reduce_masked,
    take_tokens,
    topk_split,
)
from prance.tokens.state import TokenState

__all__ = [
    "attention_importance",
    "EViTReducer",
    "Reducer",
    "ToMeReducer",
    "TokenState",
    "bipartite_soft_matching",
    "cls_importance",
    "merge",
    "merge_macs",
    "merge_masked",
    "merge_source",
    "merge_state",
    "merge_weighted",
    "prune",
    "prune_masked",
    "reduce",
    "reduce_masked",
    "take_tokens",
    "topk_split",
]
