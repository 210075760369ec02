# v2drop-eval: set-up, tests and the research loop.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all test-next test-oldest test-latest lock lint sweep tables demo train-demo demo-scenes \
	train-demo-scenes bench bench-gpu

# Everything installs from the lock, so a machine next month gets what CI tested. torch and torchvision
# are pinned together (an unpinned torch pulls a CUDA build, and a torchvision of another release does
# not load beside it); the same pins go into the lock and into test-latest.
LOCK := requirements.lock
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Two tiers (CONTRIBUTING.md, "Tests"). `make test`: the fast tier, every property on every family, method
# and kernel through the grids' all-pairs cover (tests/grid.py), at most 5 minutes on 2 cores; `make
# test-all`: the full grids and the slow end-to-end runs (lmms-eval, sweeps, the demo config). Each prints
# its wall time last. PYTEST_ARGS=... passes more (a -k, --durations=25).
FAST := -m "not slow and not grid_full"
PYTEST_ARGS ?=
test: install
	V2DROP_TEST_TIER="make test (fast tier)" $(PY) -m pytest -q $(FAST) $(PYTEST_ARGS)

test-all: install
	V2DROP_TEST_TIER="make test-all (full grids + slow)" $(PY) -m pytest -q $(PYTEST_ARGS)

# Regenerate the lock from pyproject.toml with today's releases (uv, in a venv of its own), then run
# `make install test-all test-oldest test-latest`.
UV_VENV := .venv-uv
$(UV_VENV)/bin/uv:
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install -q "uv>=0.9"

lock: $(UV_VENV)/bin/uv
	printf '%s\n' $(TORCH_PINS) | $(UV_VENV)/bin/uv pip compile pyproject.toml - --extra test \
		--universal --python-version 3.11 --upgrade --custom-compile-command "make lock" -q -o $(LOCK)

# The engine's tests (fast tier) on the oldest transformers that pyproject.toml admits: a venv of its own
# that holds only that transformers (and what it needs) in front of the locked venv's packages.
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS = $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
ENGINE_TESTS := tests/test_transformers_contract.py tests/test_engine.py tests/test_validation.py
test-oldest: install
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	echo "import site; site.addsitedir('$(abspath $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"))')" \
		> $$($(OLDEST_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/locked-venv.pth
	# with the kernels release it declares: the lock's newer kernels breaks its hub-kernels import
	$(OLDEST_VENV)/bin/python -m pip install -q "transformers[hub-kernels]==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	V2DROP_TEST_TIER="make test-oldest (engine, fast tier)" $(OLDEST_VENV)/bin/python -m pytest -q $(FAST) $(PYTEST_ARGS) \
		$(ENGINE_TESTS)

# The fast tier against the newest releases that pyproject.toml admits (not the lock), in a fresh venv.
# A failure names every package whose version differs from the lock.
LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH_PINS) -e ".[test]"
	$(LATEST_VENV)/bin/python tools/lockdiff.py $(LOCK)
	V2DROP_TEST_TIER="make test-latest (fast tier)" $(LATEST_VENV)/bin/python -m pytest -q $(FAST) $(PYTEST_ARGS) || { \
		echo "make test-latest FAILED on the newest releases that pyproject.toml admits; they differ from $(LOCK) in:"; \
		$(LATEST_VENV)/bin/python tools/lockdiff.py $(LOCK) --quiet; exit 1; }

# The upstream canary: the fast tier on the newest releases beyond pyproject.toml's caps and the lock
# (transformers, lmms-eval, accelerate, filelock, torch with its torchvision), one verdict a package:
# "raise the cap" or the tests that fail with it (tools/canary.py). Information: exits 0 (CANARY_ARGS=--strict).
NEXT_VENV ?= .venv-next
CANARY_ARGS ?=
test-next: install
	$(PY) tools/canary.py --base $(VENV) --venv $(NEXT_VENV) --lock $(LOCK) $(CANARY_ARGS)

lint: install
	$(VENV)/bin/ruff check v2drop_eval tests tools

# The research loop. `make sweep CONFIG=configs/llava15_7b.yaml` (add OUTPUT=dir to redirect),
# then `make tables RESULTS=results/llava15_7b`. Both resume / rebuild from what is on disk.
CONFIG ?= configs/smoke.yaml
RESULTS ?= results/$(basename $(notdir $(CONFIG)))
sweep: install
	$(VENV)/bin/v2drop-eval sweep $(CONFIG) $(if $(OUTPUT),--output $(OUTPUT))

tables: install
	$(VENV)/bin/v2drop-eval tables $(RESULTS)

# The embedded demo on a CPU, both benchmarks, run afresh into DEMO_OUT and DEMO_SCENES_OUT (git ignores
# them; the committed results/demo and results/demo_scenes are never written): the vqa benchmark's two demo
# models x every method (about 5 minutes on an idle 2-core machine), then the scenes benchmark's two models (each x every
# method, VisionZip LLaVA only; adaptive vs static V2Drop; about 10 minutes), each with its tables and plots and each point's
# accuracy against the committed run (same or different).
DEMO_OUT ?= results/demo-run
DEMO_SCENES_OUT ?= results/demo_scenes-run
demo: install
	rm -rf $(DEMO_OUT) $(DEMO_SCENES_OUT)
	$(VENV)/bin/v2drop-eval sweep configs/demo.yaml --output $(DEMO_OUT)
	$(VENV)/bin/v2drop-eval tables $(DEMO_OUT)
	$(VENV)/bin/v2drop-eval sweep configs/demo_scenes.yaml --output $(DEMO_SCENES_OUT)
	$(VENV)/bin/v2drop-eval tables $(DEMO_SCENES_OUT)
	@echo "demo tables and plots: $(DEMO_OUT)/tables and $(DEMO_SCENES_OUT)/tables"
	$(VENV)/bin/v2drop-eval compare $(DEMO_OUT) results/demo
	$(VENV)/bin/v2drop-eval compare $(DEMO_SCENES_OUT) results/demo_scenes

# Re-train the shipped demo models (CPU, one thread each, both at once; 55 minutes; the seeds of the shipped weights).
DEMO_MINUTES ?= 55
train-demo: install
	$(PY) -m v2drop_eval.demo.train --family llava --seed 1 --out v2drop_eval/demo/models/llava --minutes $(DEMO_MINUTES) & \
	llava=$$!; \
	$(PY) -m v2drop_eval.demo.train --family qwen2_vl --out v2drop_eval/demo/models/qwen2_vl --minutes $(DEMO_MINUTES) \
		--gather-layer 1 --freeze-vision --vision-target 0.99 --vision-steps 1500; \
	qwen=$$?; wait $$llava && exit $$qwen

# The scenes benchmark alone (configs/demo_scenes.yaml: every method, adaptive vs static V2Drop; tables by
# sub-task and complexity), run afresh into DEMO_SCENES_OUT and compared with results/demo_scenes.
demo-scenes: install
	rm -rf $(DEMO_SCENES_OUT)
	$(VENV)/bin/v2drop-eval sweep configs/demo_scenes.yaml --output $(DEMO_SCENES_OUT)
	$(VENV)/bin/v2drop-eval tables $(DEMO_SCENES_OUT)
	@echo "scenes demo tables and plots: $(DEMO_SCENES_OUT)/tables"
	$(VENV)/bin/v2drop-eval compare $(DEMO_SCENES_OUT) results/demo_scenes

# Train the scenes benchmark's two demo models (CPU), four runs: (1) LLaVA from scratch (one thread) into
# SCENES_STAGE1; (2) Qwen2-VL (two threads) with its language decoder started from that model's (the way
# real VLMs start from a pre-trained LLM) and its vision phase distilled from its image features; (3, 4)
# the shipped LLaVA model: run 1 continued twice, whole model (--init-from + --vision-from), every scene
# size, a low and then a lower learning rate (two threads), because its counting was still climbing at
# run 1's time cap (73% on the test split; 87% after run 3, 90% after run 4; docs/demo.md). Each stops
# at its steps, its minutes, or once every sub-task reaches the target on the validation split;
# train_log.json beside each model records the run (the LLaVA one also runs 1 and 3, previous_runs) and
# its test accuracy per sub-task.
SCENES_STAGE1 ?= build/scenes_llava_stage1
SCENES_STAGE2 ?= build/scenes_llava_stage2
SCENES_STEPS ?= 6000
SCENES_MINUTES ?= 85
SCENES_QWEN_STEPS ?= 3000
SCENES_QWEN_MINUTES ?= 105
# What runs 3 and 4 share: continue a model whole, every scene size, no probe heads (they are not saved).
SCENES_CONTINUE = --family llava --threads 2 --val-size 500 --aux-weight 0 --levels 40
train-demo-scenes: install
	$(PY) -m v2drop_eval.demo.train_scenes --family llava --out $(SCENES_STAGE1) \
		--steps $(SCENES_STEPS) --minutes $(SCENES_MINUTES) --target 0.92 --threads 1 --seed 0
	$(PY) -m v2drop_eval.demo.train_scenes --family qwen2_vl --out v2drop_eval/demo/models/scenes_qwen2_vl \
		--steps $(SCENES_QWEN_STEPS) --minutes $(SCENES_QWEN_MINUTES) --target 0.92 --threads 2 --seed 0 \
		--init-from $(SCENES_STAGE1) --distill-from $(SCENES_STAGE1)
	$(PY) -m v2drop_eval.demo.train_scenes $(SCENES_CONTINUE) --out $(SCENES_STAGE2) \
		--steps 7000 --minutes 48 --target 0.95 --seed 1 --lr 3e-4 \
		--init-from $(SCENES_STAGE1) --vision-from $(SCENES_STAGE1)
	$(PY) -m v2drop_eval.demo.train_scenes $(SCENES_CONTINUE) --out v2drop_eval/demo/models/scenes_llava \
		--steps 3000 --minutes 20 --target 0.97 --seed 2 --lr 1.5e-4 \
		--init-from $(SCENES_STAGE2) --vision-from $(SCENES_STAGE2)

# Prefill / decode speed vs the FLOPs limit and the dropper's own cost, paired repeats with intervals
# (docs/bench.md). `make bench SHAPE=7b-slice` writes results/bench/cpu-7b-slice.{json,md} (~20 min, 1 thread).
# Threads are pinned (BENCH_THREADS=N, else the shape's default: the CPU count, 1 for 7b-slice).
SHAPE ?= small
DEVICE ?= cpu
BENCH_THREADS ?=
BENCH_ARGS ?=
bench: install
	$(if $(BENCH_THREADS),OMP_NUM_THREADS=$(BENCH_THREADS) MKL_NUM_THREADS=$(BENCH_THREADS)) $(VENV)/bin/v2drop-eval \
		bench --shape $(SHAPE) --device $(DEVICE) $(if $(BENCH_THREADS),--threads $(BENCH_THREADS)) $(BENCH_ARGS)

# Every GPU figure in one call, at most 6 minutes on one H200; needs only torch, transformers (>= the
# oldest pyproject.toml admits) and this source (no venv, no lmms-eval, no downloads). BENCH_ARGS=--dry-run:
# the same code path on a CPU at tiny shapes.
bench-gpu:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m v2drop_eval.bench.gpu $(BENCH_ARGS)
