"""Experiment configs: `get_config(arg)` files in the big_vision style (see common.py)."""
