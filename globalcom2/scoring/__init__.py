"""Pure tensor functions that rate tokens (no module state, no hooks): used by the in-LLM methods."""
