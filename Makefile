VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench mutate mutate-pool clean

# editable_mode=strict links each package file from build/: a folder named probes/ or guard/
# in the working directory (probe.save("probes/vocoder")) cannot shadow the packages, as it
# does under the default import hook. Files added or removed re-link (the folders' mtimes).
$(STAMP): pyproject.toml guard guard/integrations guard/tools probes guard/data
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

# mutation testing of the core (README, "Mutation testing"): slow, so not part of `make test`
# or CI; run it before resolving an issue that touches the core and record the score there.
# mutmut keeps its results in mutants/ and re-runs only mutants of changed functions;
# `make mutate MUTATE_FRESH=1` starts over. MUTATE_JOBS mutants run at once.
MUTATE_STAMP := $(VENV)/.mutate-installed
MUTATE_JOBS ?= 2
$(MUTATE_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,serve,diagnose,mutate]' --config-settings editable_mode=strict
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	$(if $(MUTATE_FRESH),rm -rf mutants)
	HYPOTHESIS_PROFILE=mutation $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS)
	$(PY) mutation/score.py

# guard/pool.py apart: each of its mutants spawns workers (README, "Mutation testing")
mutate-pool: $(MUTATE_STAMP)
	$(PY) mutation/pool.py --jobs $(MUTATE_JOBS) $(if $(MUTATE_FRESH),--fresh)

clean:
	rm -rf $(VENV) build *.egg-info mutants
