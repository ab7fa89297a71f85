# One entry point for everything a newcomer (and CI) needs. See README.md.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
RUNS   ?= runs
PYTEST_ARGS ?=
CKPT   ?= $(RUNS)/digits.pt
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run demo test lint bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned, so no other package can pull a different torch build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## run: the service on this machine (SQLite + filesystem broker under ./data, no servers):
## imports digits with demo rights holders, trains the default ensemble if absent, prints
## keys, then serves the API on http://127.0.0.1:8000 with one worker (Ctrl-C stops both).
run: $(STAMP)
	$(VENV)/bin/attrib demo-setup
	$(VENV)/bin/attrib serve --host $(HOST) --port $(PORT)

## demo: the engine alone: train if absent, generate 16 samples, attribute them (runs/).
demo: $(STAMP)
	$(VENV)/bin/attrib train --out $(CKPT) --resume
	$(VENV)/bin/attrib generate --ckpt $(CKPT) --count 16 --out $(RUNS)/samples.png
	$(VENV)/bin/attrib attribute --ckpt $(CKPT) --count 16 --top-k 10 --verify-top-k 3 \
		--out-json $(RUNS)/attribution.json --out-png $(RUNS)/attribution.png
	@echo "Figure: $(RUNS)/attribution.png  Report: $(RUNS)/attribution.json  Samples: $(RUNS)/samples.png"

## test: create/update the venv, lint (ruff, mypy), and run the whole suite (extra pytest flags:
## PYTEST_ARGS, e.g. make test PYTEST_ARGS="-k api -x"): the tests not marked `serial` in
## TEST_PROCESSES processes (pytest-xdist, each test file in one process), then the `serial` ones
## alone (they stop or restart the shared PostgreSQL and Redis). pytest's exit code 5 (nothing
## selected, e.g. by -k) is not a failure of either part.
TEST_PROCESSES ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/pytest -q -n $(TEST_PROCESSES) --dist loadfile -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(VENV)/bin/pytest -q -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

bench-quick: $(STAMP)
	@for b in ensemble jacobian rank retrain api; do $(PY) bench/$$b.py --quick | tail -n 1; done

bench: $(STAMP)
	@for b in ensemble jacobian rank retrain api; do $(PY) bench/$$b.py | tail -n 1; done

clean:
	rm -rf $(RUNS) .pytest_cache .ruff_cache .mypy_cache
