"""Engines: the model runtime behind the runner (transformers now; vLLM behind the same ABC)."""
