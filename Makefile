# revseg: every entry point a user or CI needs. Each target installs what is missing first.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: help install data test lint serve phantom clean-runs

help:
	@echo "make serve    install, fetch the example CT, bootstrap a model if needed, start the server on 127.0.0.1:8000"
	@echo "make test     install and run the test suite"
	@echo "make install  create/update .venv from requirements.txt (idempotent)"
	@echo "make data     fetch the real example CT (TotalSegmentator sdist) into data/"
	@echo "make phantom  build the default phantom cohort into data/phantom"
	@echo "make lint     ruff"

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
