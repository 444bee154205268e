"""Loading LLaVA-NeXT (real checkpoints and the tiny offline model built in code)."""
