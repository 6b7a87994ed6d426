VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mnn-guard demo

test: $(STAMP)
	$(VENV)/bin/ruff check guard probes tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/mnn-guard bench

clean:
	rm -rf $(VENV) build *.egg-info
