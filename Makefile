# The two commands of the README: `make demo` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed
RUN ?= runs/demo

.PHONY: setup demo test lint format bench clean

$(STAMP): pyproject.toml requirements.lock scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(RUN)

test: $(STAMP)
	.venv/bin/ruff check advinterp tests benches studies
	.venv/bin/ruff format --check advinterp tests benches studies
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benches.bench_attacks
	$(PY) -m benches.bench_semantics
	$(PY) -m benches.bench_dissect
	$(PY) -m benches.bench_advtrain
	$(PY) -m benches.bench_scaling
	$(PY) -m benches.bench_scaling_passes
	$(PY) -m benches.bench_streaming
	$(PY) -m benches.summary

format: $(STAMP)
	.venv/bin/ruff format advinterp tests benches studies
	.venv/bin/ruff check --fix advinterp tests benches studies

clean:
	rm -rf .venv runs .pytest_cache .ruff_cache
