VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench docs dist compat compat-edges mutate mutate-pool mutate-judgement clean

EXTRAS := test,serve,diagnose,ray,docs,compat,dist

# editable_mode=strict links each package file from build/: a folder named probes/ or guard/
# in the working directory (probe.save("probes/vocoder")) cannot shadow the packages, as it
# does under the default import hook. Files added or removed re-link (the folders' mtimes).
$(STAMP): pyproject.toml $(shell find guard probes -type d -not -name __pycache__)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]' --config-settings editable_mode=strict
	touch $(STAMP)

# every failed canary of the demo leaves a bundle with its HTML page in diagnosis/ (at most 20)
demo: $(STAMP)
	$(VENV)/bin/mnn-guard demo --diagnose diagnosis

test: $(STAMP)
	$(VENV)/bin/ruff check guard probes tests examples compat noxfile.py
	$(VENV)/bin/mypy
	$(PY) -m pytest -q --durations=25

bench: $(STAMP)
	$(VENV)/bin/mnn-guard bench

# the documentation site (docs/, mkdocs.yml) with the API reference from the docstrings; strict:
# a broken link or a missing reference fails the build
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# the sdist and the wheel in dist/, checked by twine, then the wheel installed into fresh
# environments with the oldest and the newest PyMNN, `mnn-guard demo` and `inspect` run there
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --installer uv --outdir dist .
	$(VENV)/bin/twine check --strict dist/*
	$(PY) compat/wheel_check.py dist --mnn oldest --mnn newest

# every supported PyMNN release in a fresh environment (noxfile.py), then the results (a failed
# release's too) into compat/results/ and the page docs/compatibility.md; compat-edges runs
# the oldest and the newest only (as CI does) and leaves compat/results/ alone
compat: $(STAMP)
	rm -rf build/compat/results
	$(VENV)/bin/nox -s compat; status=$$?; \
	cp build/compat/results/*.json compat/results/ && $(PY) compat/report.py && exit $$status

compat-edges: $(STAMP)
	$(VENV)/bin/nox -t edges

# mutation testing of the core (docs/development.md, "Mutation testing"): slow, so not part of `make test`
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

# guard/pool/ apart: each of its mutants spawns workers (docs/development.md, "Mutation testing")
mutate-pool: $(MUTATE_STAMP)
	$(PY) mutation/subset.py pool --jobs $(MUTATE_JOBS) $(if $(MUTATE_FRESH),--fresh)

# the calibrated judgement and shadow checks apart too: their tests build many modules
mutate-judgement: $(MUTATE_STAMP)
	$(PY) mutation/subset.py judgement --jobs $(MUTATE_JOBS) $(if $(MUTATE_FRESH),--fresh)

clean:
	rm -rf $(VENV) build dist *.egg-info mutants .nox
