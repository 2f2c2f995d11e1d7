# mergeflow: `make setup` once (idempotent), then `make test` or `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergeflow-installed

# Quiet, offline-friendly defaults for every tool the project drives.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export AWS_EC2_METADATA_DISABLED := true
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-all lint format demo bench bench-demo bench-memory bench-factorize bench-core-space bench-peers mutation deploy lock clean

setup: $(STAMP)

# torch/torchvision first, by exact version: pip takes them from this machine's local files
# (any other resolver, or an unpinned torch, would download gigabytes of CUDA wheels).
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 -c constraints.txt
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps animal-mnist -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# the fast tests (~4 min on 2 cores): units, properties, faults, one small pipeline run;
# in random order (the seed is printed: --random-order-seed=N repeats an order)
test: setup
	$(PY) -m ruff check mergeflow tasks flows zoo tests bench infra
	$(PY) -m pytest -m "not full" --random-order

# every test (CI): also the real Prefect server with a worker and the browser test, the
# demo zoo's adaptation tests (building .demo/zoo once, ~9 min), whole-pipeline variants
test-all: setup
	$(PY) -m ruff check mergeflow tasks flows zoo tests bench infra
	$(PY) -m pytest --random-order

lint: setup
	$(PY) -m ruff check mergeflow tasks flows zoo tests bench infra
	$(PY) -m ruff format --check mergeflow tasks flows zoo tests bench infra

format: setup
	$(PY) -m ruff format mergeflow tasks flows zoo tests bench infra
	$(PY) -m ruff check --fix mergeflow tasks flows zoo tests bench infra

demo: setup
	$(PY) -m flows.demo

bench: setup
	$(PY) bench/grid.py

# the least time a first `make demo` can take here: its arithmetic over the matmul ceiling
bench-demo: setup
	$(PY) bench/demo_budget.py

bench-memory: setup
	$(PY) bench/memory.py

# the truncated SVD (float64 Gram + eigh) against a full LAPACK SVD, per shape and model
bench-factorize: setup
	$(PY) bench/factorize.py

# Core Space against the full-space merge of the same LoRA adapters (Llama shape, T = 8)
bench-core-space: setup
	$(PY) bench/core_space.py

# mergeflow beside mergekit (in a venv of its own under .bench/) and FusionBench, paired;
# PEERS_ARGS passes options, e.g. PEERS_ARGS="--size 1b --repeats 1".
bench-peers: setup
	$(PY) bench/peers.py $(PEERS_ARGS)

# mutmut over the core's scope (bench/mutation.py) against its fast tests; prints the share
# of mutants caught per module, the equivalent survivors' reasons and any other survivor's
# diff. About 20 minutes on 2 cores (README, "Mutation testing");
# `$(PY) bench/mutation.py --report` reads the last run again.
mutation: setup
	$(PY) bench/mutation.py

# Work pools (cpu, gpu), the gpu tag limit and every deployment of prefect.yaml, on the
# Prefect server at PREFECT_API_URL. GPUS=2 for two GPUs; NIGHTLY_SPEC=spec.yaml for the
# scheduled run's spec; ARRIVALS_SPEC=arrivals.yaml for merge-arrivals' stream.
GPUS ?= 1
deploy: setup
	$(PY) infra/setup_prefect.py --gpus $(GPUS) $(if $(NIGHTLY_SPEC),--nightly-spec $(NIGHTLY_SPEC)) \
		$(if $(ARRIVALS_SPEC),--arrivals-spec $(ARRIVALS_SPEC))

lock: setup
	( echo "# Exact versions of the whole stack, from 'make lock' (pip freeze of a working .venv)."; \
	  $(PY) -m pip freeze --exclude-editable | grep -vi '^mergeflow' ) > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
