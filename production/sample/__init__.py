"""Sampling: prompts, and generation through a KV cache (prefill, then one-token decode steps)."""
