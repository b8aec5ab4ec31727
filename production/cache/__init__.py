"""The KV cache: block formats (quant), policies (policy), streams and layers (kvcache), attention of new
queries over a cache (attend), and memory measurement (memory). Imports nothing from the model."""
