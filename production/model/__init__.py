"""The network: ModelConfig, RoPE, the four attention variants behind one registry, and the GPT. Imports only
production.core and production.cache (the KV cache it writes and reads while decoding)."""
