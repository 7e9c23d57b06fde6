# revseg: every entry point a user or CI needs. Each target installs what is missing first.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: help install data test lint serve phantom clean-runs demo benchmark

help:
	@echo "make serve    install, fetch the example CT, bootstrap a model if needed, start the server on 127.0.0.1:8000"
	@echo "make test     install and run the test suite"
	@echo "make install  create/update .venv from requirements.txt (idempotent)"
	@echo "make data     fetch the real example CT (TotalSegmentator sdist) into data/"
	@echo "make phantom  build the default phantom cohort into data/phantom"
	@echo "make lint     ruff"
	@echo "make demo     the whole experiment on a phantom cohort (round 1, attention, expert, continual vs full,"
	@echo "              evaluation, runs/demo/report.md); CPU config < 30 min on 2 cores. DEMO_ARGS='--config paper'"
	@echo "make benchmark  inference latency/memory per backbone, size scaling, round-2 and scoring cost (BENCH_ARGS='--quick')"

install:
	@bash scripts/install.sh

data: install
	@$(PY) -m lib.example_ct

phantom: data
	@$(PY) -m lib.phantom --out data/phantom --num-cases 20 --seed 0 --spacing 3

test: install data
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .

serve: install data
	$(PY) -m lib.serve $(SERVE_ARGS)

clean-runs:
	rm -rf runs

demo: data
	$(PY) -m lib.experiment --out runs/demo --config cpu $(DEMO_ARGS)

benchmark: data
	$(PY) -m lib.benchmark $(BENCH_ARGS)
