"""Shared utilities for the metric-learning notebooks."""

__version__ = "0.1.0"
