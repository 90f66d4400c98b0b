"""Evaluation: metrics and benchmark harnesses (import the submodules, e.g. titans.eval.metrics)."""
