"""Evaluation of trained checkpoints: teacher-forced scoring with and without a KV cache, and the
lm-evaluation-harness adapter."""
