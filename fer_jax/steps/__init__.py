"""Jitted per-method update functions (one module per method)."""
