"""Facts and helpers every layer shares; nothing here imports another production package."""
