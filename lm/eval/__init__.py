"""Generation with a KV cache, task scoring and held-out evaluation of a run."""
