"""Shared test configuration."""

import os

# Plots render off screen in every test; notebooks under papermill pick this up too.
os.environ.setdefault("MPLBACKEND", "Agg")
