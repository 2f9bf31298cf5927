# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each creates .venv on first use, with the CPU build of torch pinned.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-teacher test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[test,onnx]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf outputs/demo  # a fresh run each time (re-running into a run directory resumes it)
	$(BIN)/prune train demo hydra.run.dir=outputs/demo

# Re-make the demo's teacher (about 20 minutes on 2 cores): pre-train, then replace data/demo_teacher.
demo-teacher: $(STAMP)
	rm -rf outputs/demo_teacher
	$(BIN)/prune pretrain demo_teacher hydra.run.dir=outputs/demo_teacher
	rm -rf data/demo_teacher && cp -r outputs/demo_teacher/export data/demo_teacher

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
