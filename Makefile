# gpuslice: `make` builds the library and the CLI; `make demo` and `make test` are the two
# commands a fresh machine needs (README.md).
CARGO ?= cargo
RELEASE := target/release
LIB := $(RELEASE)/libgpuslice.so
CLI := $(RELEASE)/gpuslice

.PHONY: all build demo test gpu-bundle gpu-test gpu-bench gpu-ctl gpu-soak clean

all: build

build:
	$(CARGO) build --release -p gpuslice-shim -p gpuslice

# The main job: a program fills device memory under a 4 GiB quota. On the real GPU when
# nvidia-smi sees one, otherwise on the simulated device that CI uses.
demo:
	$(CARGO) build --release -p gpuslice-shim -p gpuslice -p quota-fill -p gpuslice-simcuda -p gpuslice-simnvml
	bash examples/demo.sh

# Everything CI checks: unit tests, and the shim in real processes against the simulated driver.
test:
	$(CARGO) build --workspace
	$(CARGO) test --workspace

# What the GPU machine needs, in .gpu/ (git-ignored; carried by the device tool).
gpu-bundle:
	$(CARGO) build --release -p gpuslice-shim -p gpuslice -p quota-fill
	mkdir -p .gpu
	cp $(LIB) $(CLI) $(RELEASE)/quota-fill .gpu/

# The acceptance runs on a machine with an NVIDIA GPU and nvcc (no Rust needed there):
# uses .gpu/libgpuslice.so, or $GPUSLICE_LIB.
gpu-test:
	bash tests/gpu/acceptance.sh

# SM-share accuracy on the real GPU (shares 10-70%, graphs, two processes, PyTorch); needs the
# same .gpu/ bundle.
gpu-bench:
	bash tests/gpu/bench.sh

# The controller on the real GPU: a group quota shared by two PyTorch processes, a live edit,
# kill -9, and SM shares set and changed through the controller; needs the same .gpu/ bundle.
gpu-ctl:
	bash tests/gpu/controller.sh

# The soak on the real GPU: four workloads (CUDA C++ and PyTorch) under quotas, shares and
# priorities for SOAK_SECONDS (default 540), one killed -9 and restarted every 30 s; needs the
# same .gpu/ bundle. SOAK_DRY_RUN=1 runs it here on the simulated driver (needs `cargo build`).
gpu-soak:
	bash tests/gpu/soak.sh

clean:
	$(CARGO) clean
	rm -rf .gpu
