"""Core library of the therapeutic-alliance data platform (no Dagster imports here)."""

__version__ = "0.1.0"
