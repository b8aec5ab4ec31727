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

bench-gpu:  ## every GPU check in one run (CUDA tests, train, decode torch vs Triton, 128k memory, torchrun); <= 8 min
	$(PYTHON) -m production.bench_gpu --out runs/bench_gpu

paper:  ## paper.pdf from paper.tex and the generated assets (python generate_paper_figures.py first)
	@test -f assets/table_main.tex || { echo "assets/ is empty: run python generate_paper_figures.py first"; exit 2; }
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex > /dev/null
	bibtex paper > /dev/null
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex > /dev/null
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex | grep -E "Output written|Warning" || true

reference:  ## the cpu_reference group (4 variants x 3 seeds at nano, about 75 min on 2 cores) -> results/cpu_reference/
	$(PYTHON) run_paper_manifest.py --group cpu_reference --post-mem128k --post-eval
	$(PYTHON) generate_paper_figures.py --group cpu_reference --out results/cpu_reference
