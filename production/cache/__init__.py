"""The KV cache: block formats (formats: what a block holds; quant: encode/decode and llama.cpp bytes),
rotations (rotation), policies (policy), streams and layers (kvcache), attention of new queries over a cache
(attend), and memory measurement (memory). Imports nothing from the model."""
