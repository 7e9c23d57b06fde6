# revseg: every entry point a user or CI needs. Each target installs what is missing first.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: help install data test lint serve phantom clean-runs

help:
	@echo "make serve    install, fetch the example CT and start the MONAI Label server (see README)"
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
	@echo "make serve: the MONAI Label app (issue 5) has not landed yet; nothing to serve." >&2
	@exit 2

clean-runs:
	rm -rf runs
