# The two commands: `make run` (the main job on the local stack) and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The prefect CLI talks to the local server that `make run` starts (see flows/local_stack.py).
PREFECT := PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_HOME=$(CURDIR)/.stack/prefect $(VENV)/bin/prefect

.PHONY: install run rollback stop status test test-fast lint bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes: the venv is ~3 GB and must be reused.
$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# `make run REPLICAS=3`: three local model servers, each with its own store; the run rolls out
# to one canary, then to the other two (push.stages).
REPLICAS ?= 1

run: install
	$(PY) -m flows.local_stack up --replicas $(REPLICAS)
	$(PREFECT) deployment run train-and-serve/on-demand --watch \
	  --params '$(shell $(PY) -m flows.local_stack params --replicas $(REPLICAS))'; status=$$?; \
	$(PY) -m flows.report; \
	if [ $$status -eq 0 ]; then $(PY) -m serving.client --server 127.0.0.1:8500 --num_tests 1000; fi; \
	exit $$status

# Every replica back to the previous champion (registry alias previous_champion).
rollback: install
	$(PREFECT) deployment run rollback/rollback --watch \
	  --params '$(shell $(PY) -m flows.local_stack params --replicas $(REPLICAS))'

stop:
	@test -x $(PY) && $(PY) -m flows.local_stack down || true

status: install
	@$(PY) -m flows.local_stack status

# Everything, lint included (what CI runs: .ci/run).
test: install lint
	$(PY) -m pytest -q

# The quick subset: no server, Prefect, MLflow or training processes.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: stop
	rm -rf .stack

# Load from a separate process (h2load); results with the exact command go to benchmarks/RESULTS.md.
bench: install
	@command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) -m benchmarks.run --write benchmarks/RESULTS.md
