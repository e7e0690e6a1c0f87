"""Execution engine: per-image plans run physically, grouped and packed for real speed."""

from prance.engine.executor import ATTENTION_MODES, DynamicExecutor

__all__ = ["ATTENTION_MODES", "DynamicExecutor"]
