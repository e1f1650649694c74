PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): requirements.txt requirements-embedded.txt pyproject.toml
	@test -n "$(PY)" || { echo "error: no python3.11 or python3 found (set PY=/path/to/python3.11)" >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-embedded.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hetmem demo

# tests/test_serve.py starts Ray Serve inside pytest: it runs in a process of its own, after the rest (a Ray
# driver that earlier tests started and stopped in the same process once crashed the interpreter there).
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests --ignore=tests/test_serve.py
	$(BIN)/python -m pytest -q tests/test_serve.py

clean:
	rm -rf $(VENV)
