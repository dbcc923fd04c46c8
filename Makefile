# `make demo` and `make test` both create .venv/ when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.neuroscan-installed
# CPU-only machines get the small CPU build of torch first; an unpinned torch is a multi-GB CUDA build.
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_CUDA),yes)
	$(PY) -m pip install -q torch==2.13.0
endif
	$(PY) -m pip install -q -e '.[dev,bench,deepspeed]'
	touch $(STAMP)

# The demo: in-context prompts of three variants, scanned with the trained demo model
# (workers/demo/; --low -1, below GELU's minimum, so that the red rule alone selects), the
# neurons that separate prompts with examples from those without, and the report.
demo: $(STAMP)
	$(VENV)/bin/neuroscan prompts generate --n 390 --variants icl,zero_shot,shuffled --seed 7 --out runs/demo-prompts.jsonl
	$(VENV)/bin/neuroscan scan runs/demo-prompts.jsonl --out runs/demo --model demo --stages 2 --low -1 --overwrite
	$(VENV)/bin/neuroscan compare runs/demo --by variant --a icl --b zero_shot --sort q --top 10 --out runs/demo-icl-vs-zero-shot.parquet
	$(VENV)/bin/neuroscan report runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests --ignore=tests/integration/test_multinode.py
	$(PY) -m pytest -q tests/integration/test_multinode.py  # a process of its own: see its docstring

clean:
	rm -rf runs/ .pytest_cache
