# cal-pose: one entry point for set-up, the pipeline, tests, benchmarks and images.
# `make run` and `make test` each install what they need (venv in .venv/).
SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ARGS ?=

.PHONY: setup run test test-slow lint compile bench images base-image run-containers clean

setup: $(STAMP)  ## idempotent: a no-op when .venv matches requirements.lock and pyproject.toml

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
	set -o pipefail; $(PY) -m pip install -q -r requirements.lock 2>&1 | { grep -v '^WARNING: Location' || true; }
	set -o pipefail; $(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(PY) -m pip check
	@touch $(STAMP)

run: setup  ## the whole pipeline end to end, locally (kfp.local), on synthetic people (or COCO_ROOT=...)
	$(PY) -m pipelines.run_local $(RUN_ARGS)

test: setup  ## the default suite (fast; no slow marks)
	$(PY) -m pytest -q

test-slow: setup  ## the slow suite: image builds, containers, long training
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check cal_core components pipelines tests benchmarks

compile: setup  ## writes pipelines/cal_pipeline.yaml (committed; a test fails when stale)
	$(PY) -m pipelines.compile

bench: setup  ## the DESIGN.md benchmarks (not model_stats, stage2_settings), results in benchmarks/results/*.json
	for b in codec_oracle downsample loader train_step gmm onnx accuracy; do $(PY) -m benchmarks.$$b || exit 1; done

base-image:  ## local Debian base image for podman when no registry is reachable
	bash images/make_base_image.sh

images: setup  ## builds every stage image with podman or docker
	bash images/build.sh

run-containers: setup  ## the whole DAG with every stage in its own image (podman)
	bash images/run_containers.sh $(RUN_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
