# v2drop-eval: set-up, tests and the research loop.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint sweep tables demo train-demo bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision pinned together in one command: an unpinned torch pulls a CUDA build,
	# and lmms-eval's requirements would otherwise pull a torchvision that does not load beside it.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check v2drop_eval tests

# The research loop. `make sweep CONFIG=configs/llava15_7b.yaml` (add OUTPUT=dir to redirect),
# then `make tables RESULTS=results/llava15_7b`. Both resume / rebuild from what is on disk.
CONFIG ?= configs/smoke.yaml
RESULTS ?= results/$(basename $(notdir $(CONFIG)))
sweep: install
	$(VENV)/bin/v2drop-eval sweep $(CONFIG) $(if $(OUTPUT),--output $(OUTPUT))

tables: install
	$(VENV)/bin/v2drop-eval tables $(RESULTS)

# The embedded demo on a CPU: both shipped demo models x methods x schedules on the synthetic
# benchmark (about 4 minutes on 2 cores), run afresh into DEMO_OUT (git ignores it; the committed
# results/demo is never written), then its tables and plots, then each point's accuracy against
# the committed results/demo (same or different).
DEMO_OUT ?= results/demo-run
demo: install
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/v2drop-eval sweep configs/demo.yaml --output $(DEMO_OUT)
	$(VENV)/bin/v2drop-eval tables $(DEMO_OUT)
	@echo "demo tables and plots: $(DEMO_OUT)/tables"
	$(VENV)/bin/v2drop-eval compare $(DEMO_OUT) results/demo

# Re-train the shipped demo models (CPU, one thread each, both at once; 55 minutes; the seeds of the shipped weights).
DEMO_MINUTES ?= 55
train-demo: install
	$(PY) -m v2drop_eval.demo.train --family llava --seed 1 --out v2drop_eval/demo/models/llava --minutes $(DEMO_MINUTES) & \
	llava=$$!; \
	$(PY) -m v2drop_eval.demo.train --family qwen2_vl --out v2drop_eval/demo/models/qwen2_vl --minutes $(DEMO_MINUTES) \
		--gather-layer 1 --freeze-vision --vision-target 0.99 --vision-steps 1500; \
	qwen=$$?; wait $$llava && exit $$qwen

# Prefill / decode speed vs the FLOPs limit. On a GPU: make bench SHAPE=llava-1.5-7b DEVICE=cuda
SHAPE ?= small
DEVICE ?= cpu
BENCH_ARGS ?=
bench: install
	$(VENV)/bin/v2drop-eval bench --shape $(SHAPE) --device $(DEVICE) $(BENCH_ARGS)
