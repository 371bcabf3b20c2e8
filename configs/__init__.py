"""Experiment configs: `get_config(arg)` per file; see WORKSPACE.md for the list."""
