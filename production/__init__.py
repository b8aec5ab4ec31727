"""The Decoupled Bottleneck Attention harness. The sub-packages are layered; each imports only from those
listed before it (docs/ARCHITECTURE.md has the map):

core    errors, atomic files, run-directory layout, device and environment facts, the command wrapper
cache   KV-cache block formats, policies, streams, attention over a cache, memory measurement
model   ModelConfig, RoPE, the four attention variants, the GPT, the Hugging Face Llama loader
data    tokenizer, embedded corpus, token files, splits and samplers, the FineWeb-Edu pipeline
config  size/exp presets, the one table of options, resolve(size, exp, overrides) -> ResolvedRun
tune    the decision store; training-runtime, cache-policy and decode-plan decisions
train   checkpoints, optimizer, distributed wrappers, the training loop
sample  generation with a KV cache, prompts
bench   benchmarks: training step, decode, 128k memory, data preparation, the GPU check
upcycle a trained standard/GQA model (or a Hugging Face Llama) turned into DBA: surgery and distillation
paper   the manifest, its runner, results, figures and tables
cli     the `main.py` modes
"""
