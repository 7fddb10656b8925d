# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs the
# package with what it needs; the stamp (named after pyproject.toml's hash) makes a second run
# install nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: install demo test test-avx2 lint bench bench-fidelity clean image image-gpu image-clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch and torchvision first, pinned: pip takes them from the local wheel cache here
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/wsi-prune demo --out $(DEMO_OUT)

test: install
	$(BIN)/ruff check wsi_prune tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The tests with the kernels of a CPU without AVX-512 (torch, oneDNN, numpy and OpenBLAS told
# not to use it): float rounding changes, as on another CI machine. A test whose margin holds
# only on this CPU's numbers fails here. Useful on AVX-512 machines only (elsewhere the same).
test-avx2: install
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
		NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL" OPENBLAS_CORETYPE=Haswell \
		$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check wsi_prune tests benchmarks

# Every benchmark with the settings of docs/benchmarks.md (about an hour on 2 cores; the 100k²
# slide of the tiling benchmark alone writes for ~18 min). Results go to bench-out/.
bench: install
	$(BIN)/python benchmarks/bench_tiling.py --work bench-out/tiling --repeats 5 \
		--rss-sizes 4000 20000 50000 100000 --max-gen-seconds 3600
	$(BIN)/python benchmarks/bench_pruning.py --batch 32 --reps 3 --threads 2
	$(BIN)/python benchmarks/bench_end_to_end.py --out bench-out/e2e
	$(BIN)/python benchmarks/bench_scale.py --out bench-out/scale --markdown bench-out/scale/table.md
	$(BIN)/python benchmarks/bench_tissue.py --out bench-out/tissue
	$(BIN)/python benchmarks/bench_outputs.py --out bench-out/outputs
	$(BIN)/python benchmarks/bench_faults.py all --points 24 --n 200 --out bench-out/faults

# The fidelity benchmark (issue 11): trains scorer, ViT and MIL heads for 3 seeds on real-texture
# slides and compares dense and pruned runs at 2/5/10 % of tissue tokens. Hours on 2 cores;
# resumable (every step is cached in bench-out/fidelity).
bench-fidelity: install
	$(BIN)/python benchmarks/bench_fidelity.py --work bench-out/fidelity

# Container images (podman, else docker), built by docker/build.sh: it skips the build when an
# image of the same sources exists, and on a machine set up by ../shared/containers/setup.sh (no
# registry) builds from its local Debian base. Variables: WSI_BASE, TORCH_INDEX_URL, WSI_ENGINE,
# WSI_IMAGE_NAME (docker/build.sh, docker/README.md). The GPU image is built here, never run.
image:
	docker/build.sh cpu

image-gpu:
	docker/build.sh gpu

image-clean:
	docker/build.sh --clean

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
