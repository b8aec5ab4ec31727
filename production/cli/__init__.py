"""The `main.py` modes: the parser and dispatch (main), `--mode train` (train) and `--mode sample` (sample)."""
