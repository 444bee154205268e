"""Pure tensor functions that rate tokens (no module state, no hooks): [CLS] scores for pre-LLM methods,
attention recomputes, selection and clustering for the in-LLM methods."""
