"""Attach points: the pre-LLM feature hook (and, with in-LLM methods, the decoder-layer hook)."""
