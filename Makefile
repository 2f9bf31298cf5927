# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each creates .venv on first use, with the CPU build of torch pinned.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf outputs/demo  # a fresh run each time (re-running into a run directory resumes it)
	$(BIN)/prune train tiny_demo hydra.run.dir=outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
