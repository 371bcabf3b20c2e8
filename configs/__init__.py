"""Experiment configs: `get_config(arg)` per file; WORKSPACE.md#configs lists them."""
