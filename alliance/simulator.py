"""The clinic simulator's public entry point (the implementation lives in alliance.simulation)."""

from alliance.simulation import SimParams, default_truth_path, simulate

__all__ = ["SimParams", "default_truth_path", "simulate"]
