# searchsvc — `make run` and `make test` are all a newcomer needs; both call `make setup` first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/quickstart.yaml
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup run test test-all soak bench gpu-check bench-gpu bench-n2n docs clean-store help

help:            ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/ —/'

setup: $(STAMP)  ## create .venv and install the package editable with its dev extra (fast when nothing changed)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing searchsvc and its dependencies into $(VENV) (first time: a few minutes)"
	@$(BIN)/python -m pip install -q --no-cache-dir --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v 'is ignored: it is neither' || true
	@$(BIN)/python -c "import searchsvc, torch, ray" || { echo "setup: install failed"; exit 1; }
	@bash scripts/install-datasets.sh
	@touch $(STAMP)

run: setup       ## run the quickstart search (CONFIG=... to choose another config), then write report.html
	$(BIN)/searchsvc run $(CONFIG) --report report.html

test: setup      ## the test suite that runs on a 2-core CPU machine (no slow, no gpu tests)
	@bash scripts/install-chromium.sh
	$(BIN)/python -m pytest -m "not slow and not gpu" -n 2 --dist loadscope --no-loadscope-reorder --durations=15

test-all: setup  ## every test, slow ones included
	$(BIN)/python -m pytest

soak: setup      ## every read-only command hundreds of times under full CPU load (~20 min); benchmarks/results/soak.json
	$(BIN)/python benchmarks/soak.py

bench: setup     ## CPU benchmarks; JSON lands in benchmarks/results/
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/store_throughput.py
	$(BIN)/python benchmarks/pool_overhead.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/epoch_time.py --device cpu
	$(BIN)/python benchmarks/evals_per_hour.py
	$(BIN)/python benchmarks/driver_overhead.py

gpu-check:       ## the GPU check with torch alone, no make setup (about 4 minutes on an H100); JSON in benchmarks/results/gpu/
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py --out benchmarks/results/gpu

bench-gpu: setup ## the GPU check, then the Ray GPU tests and benchmarks on one NVIDIA GPU; JSON in benchmarks/results/
	PYTHONPATH=. $(BIN)/python benchmarks/gpu_check.py --out benchmarks/results/gpu
	$(BIN)/python -m pytest -q -m "gpu and ray" -p no:cacheprovider
	$(BIN)/python benchmarks/epoch_time.py --device cuda
	$(BIN)/python benchmarks/epoch_time.py --device cuda --cached
	$(BIN)/python benchmarks/epoch_time.py --device cuda --compile
	$(BIN)/python benchmarks/evals_per_hour.py --teacher resnet18_cifar
	$(BIN)/python benchmarks/evals_per_hour.py --teacher resnet20
	$(BIN)/python benchmarks/driver_overhead.py
	$(BIN)/python benchmarks/train_throughput.py --arch resnet18_cifar --channels 3 --size 32 --batch 512 --device cuda

bench-n2n: setup ## PPO vs random search on Fashion-MNIST with the stored quickstart teacher (make run first), 5 seeds x 64 evaluations
	$(BIN)/python benchmarks/n2n_agents.py

docs: setup      ## regenerate docs/config.md from the config schemas (after a schema changes; a test checks it)
	$(BIN)/searchsvc config --all --markdown > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md

clean-store:     ## delete the default local store
	rm -rf ./searchsvc-store
