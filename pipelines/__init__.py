"""Compositions of cropi stages: the CROPI loop and the baseline comparison."""
