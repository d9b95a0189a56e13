# make run: the whole product on the embedded dev stack. make test: the suite on real servers.
# Both create .venv and install into it when needed; Python >= 3.11 must be on PATH as python3.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint schema clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m devstack up

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

schema: $(STAMP)
	$(PY) starter.py schema

clean:
	rm -rf $(VENV) .devstack .pytest_cache .mypy_cache .ruff_cache
