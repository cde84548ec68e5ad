"""The cloud side: an OpenAI-compatible service over any HF causal LM, and a client for any such server."""
