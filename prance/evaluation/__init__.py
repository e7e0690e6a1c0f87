"""Evaluation: accuracy, MACs, parameters and tokens of a model under a plan."""
