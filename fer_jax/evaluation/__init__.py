"""Evaluation: metrics from predictions and figures."""
