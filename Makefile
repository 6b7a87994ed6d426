VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# editable_mode=strict links each package file from build/: a folder named probes/ or guard/
# in the working directory (probe.save("probes/vocoder")) cannot shadow the packages, as it
# does under the default import hook. Files added or removed re-link (the folders' mtimes).
$(STAMP): pyproject.toml guard guard/tools probes guard/data
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,serve,diagnose,ray]' --config-settings editable_mode=strict
	touch $(STAMP)

# every failed canary of the demo leaves a bundle with its HTML page in diagnosis/ (at most 20)
demo: $(STAMP)
	$(VENV)/bin/mnn-guard demo --diagnose diagnosis

test: $(STAMP)
	$(VENV)/bin/ruff check guard probes tests examples
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/mnn-guard bench

clean:
	rm -rf $(VENV) build *.egg-info
