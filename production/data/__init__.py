"""Data: the offline GPT-2 tokenizer, the embedded corpus, token files (.npy, llm.c shards), splits and
samplers, and the FineWeb-Edu preparation pipeline."""
