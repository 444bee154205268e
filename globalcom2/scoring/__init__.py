"""Scoring functions: pure tensor code that turns attention into per-token scores."""
