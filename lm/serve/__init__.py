"""Serving a run: the continuous-batching decoder (engine) and the OpenAI-compatible API (api)."""
