"""Benchmarks, each a command that measures one thing in one process: the training step by attention mode
(train), decode steps by context and cache policy (decode), KV-cache memory at 128k (memory, behind
production/bench_end_to_end_memory.py), bytes, quality and decode speed per cache policy (compress) and data
preparation (prepare)."""
