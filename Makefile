# Every target bootstraps .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: demo test test-slow bench clean

# torch first, pinned: it resolves to the local CPU wheel, so pip never pulls
# the multi-GB CUDA build that an unpinned dependency would bring.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# compile the numba kernels once (numba caches them next to the sources), so no training run or
	# env runner spends its first step compiling (~8 s on 2 cores): two steps of the grouped view use them all,
	# for this CPU and for the generic x86-64 target that training runs pin (evgrid.cluster.environment)
	$(BIN)/evgrid bench env --feeder ieee33 --evs 1000 --steps 2 --views grouped > /dev/null
	NUMBA_CPU_NAME=generic $(BIN)/evgrid bench env --feeder ieee33 --evs 1000 --steps 2 --views grouped > /dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/evgrid demo

# the default suite (< 10 min on 2 cores); CI also runs test-slow
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --timeout=900

# Runs pytest only when some test is marked slow (collection exits 5 when
# none is), so a CI log never ends on a run that executed no test.
test-slow: $(STAMP)
	@$(BIN)/python -m pytest -q --collect-only -m slow >/dev/null; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no test is marked slow"; exit 0; fi; \
	[ $$rc -eq 0 ] || exit $$rc; \
	$(BIN)/python -m pytest -q -m slow --timeout=3600

bench: $(STAMP)
	$(BIN)/evgrid bench powerflow --feeder ieee33 --batch 1 64 1024 8192 --json
	$(BIN)/evgrid bench env --feeder ieee33 --evs 1000 10000 100000 --json
	$(BIN)/evgrid bench env --feeder ieee33 --evs 2000 --views individual --json
	$(BIN)/evgrid bench actor --clients 1 2 4 8 --scenarios-per-call 1 8 --json
	$(BIN)/evgrid bench train --json
	$(BIN)/evgrid bench opf --feeder ieee33 feeder14 cigre_mv --json

clean:
	rm -rf $(VENV) build *.egg-info
