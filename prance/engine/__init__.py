"""Execution engine: per-image plans run physically (grouped, packed) or masked, stage by stage."""

from prance.engine.executor import DynamicExecutor, ExecutionState
from prance.engine.grid import ATTENTION_MODES
from prance.engine.masked import MaskedExecutionState, MaskedExecutor
from prance.engine.stepwise import Outcome, Rollout, RolloutStep, StepwiseExecutor

__all__ = [
    "ATTENTION_MODES",
    "DynamicExecutor",
    "ExecutionState",
    "MaskedExecutionState",
    "MaskedExecutor",
    "Outcome",
    "Rollout",
    "RolloutStep",
    "StepwiseExecutor",
]
