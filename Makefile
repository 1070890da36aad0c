# gpuslice: `make` builds the library and the CLI; `make demo` and `make test` are the two
# commands a fresh machine needs (README.md).
CARGO ?= cargo
RELEASE := target/release
LIB := $(RELEASE)/libgpuslice.so
CLI := $(RELEASE)/gpuslice

# PROFILE=debug makes `build`, `install` and `deb` use target/debug (CI packages the debug build
# it has already made, rather than spend minutes on a release build).
PROFILE ?= release
OUT := target/$(PROFILE)
CARGO_PROFILE := $(if $(filter debug,$(PROFILE)),,--profile $(PROFILE))

.PHONY: all build dra demo test check-k8s check-packaging install uninstall deb gpu-bundle gpu-test gpu-bench gpu-ctl gpu-soak clean

all: build

build:
	$(CARGO) build $(CARGO_PROFILE) -p gpuslice-shim -p gpuslice

# The Kubernetes DRA kubelet plugin (a separate binary: its gRPC and Kubernetes client stay out of
# the library and the CLI); examples/kubernetes/dra/ runs it.
dra:
	$(CARGO) build $(CARGO_PROFILE) -p gpuslice-dra

# The main job: a program fills device memory under a 4 GiB quota. On the real GPU when
# nvidia-smi sees one, otherwise on the simulated device that CI uses.
demo:
	$(CARGO) build --release -p gpuslice-shim -p gpuslice -p quota-fill -p gpuslice-simcuda -p gpuslice-simnvml
	bash examples/demo.sh

# Everything CI checks: formatting, the layers of docs/layers.toml (tests/layers), clippy
# (warnings are errors), unit tests, and the shim in real processes against the simulated driver.
test:
	$(CARGO) fmt --all --check
	python3 -B tests/layers/check_layers.py
	python3 -B -m unittest discover -s tests/layers -p 'test_*.py'
	$(CARGO) build --workspace
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace
	$(MAKE) check-k8s check-packaging PROFILE=debug

# The Kubernetes examples: schema-valid (strict) for the Kubernetes versions tests/kubernetes
# names, and consistent with what gpuslice reads and with each other (tests/kubernetes/check.py).
# The DRA example (examples/kubernetes/dra) too, with the ResourceSlice and CDI specs that
# `cargo test -p gpuslice-dra` saved in target/dra (so `make test` runs the tests first).
# The validator is a pinned PyPI package installed once into target/k8s-venv; offline afterwards.
K8S_VENV := target/k8s-venv
$(K8S_VENV)/.installed: tests/kubernetes/requirements.txt
	rm -rf $(K8S_VENV)
	python3 -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/kubernetes/requirements.txt
	touch $@

check-k8s: $(K8S_VENV)/.installed
	$(K8S_VENV)/bin/python -B tests/kubernetes/check.py --gpuslice $(OUT)/gpuslice

# `make install` into a temporary DESTDIR, `make uninstall` and the Debian package, checked file
# by file (tests/packaging/check.sh).
check-packaging:
	bash tests/packaging/check.sh $(PROFILE)

# What the GPU machine needs, in .gpu/ (git-ignored; carried by the device tool).
gpu-bundle:
	$(CARGO) build --release -p gpuslice-shim -p gpuslice -p quota-fill -p gpuslice-dra
	mkdir -p .gpu
	cp $(LIB) $(CLI) $(RELEASE)/quota-fill $(RELEASE)/gpuslice-dra .gpu/

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

# Installation, GNU style: `make install PREFIX=/usr/local DESTDIR=`. It builds only what is
# missing (so `sudo make install` after `make` never runs cargo as root); run `make` after a change.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
DATADIR ?= $(PREFIX)/share
DOCDIR ?= $(DATADIR)/doc/gpuslice
UNITDIR ?= $(LIBDIR)/systemd/system

$(OUT)/gpuslice $(OUT)/libgpuslice.so:
	$(CARGO) build $(CARGO_PROFILE) -p gpuslice-shim -p gpuslice

install: $(OUT)/gpuslice $(OUT)/libgpuslice.so
	install -D -m 0755 $(OUT)/gpuslice $(DESTDIR)$(BINDIR)/gpuslice
	install -D -m 0644 $(OUT)/libgpuslice.so $(DESTDIR)$(LIBDIR)/libgpuslice.so
	install -D -m 0644 include/gpuslice.h $(DESTDIR)$(INCLUDEDIR)/gpuslice.h
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' packaging/gpuslice.service.in > $(DESTDIR)$(UNITDIR)/gpuslice.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/gpuslice.service
	install -D -m 0644 packaging/config.toml $(DESTDIR)$(DATADIR)/gpuslice/config.toml
	install -D -m 0644 -t $(DESTDIR)$(DOCDIR) README.md LD_PRELOAD.md

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/gpuslice $(DESTDIR)$(LIBDIR)/libgpuslice.so $(DESTDIR)$(INCLUDEDIR)/gpuslice.h
	rm -f $(DESTDIR)$(UNITDIR)/gpuslice.service $(DESTDIR)$(DATADIR)/gpuslice/config.toml
	rm -f $(DESTDIR)$(DOCDIR)/README.md $(DESTDIR)$(DOCDIR)/LD_PRELOAD.md
	rmdir $(DESTDIR)$(DATADIR)/gpuslice $(DESTDIR)$(DOCDIR) 2>/dev/null || true

# A Debian package, target/deb/gpuslice_<version>_<arch>.deb, built with dpkg-deb from
# `make install PREFIX=/usr` (packaging/make-deb.sh says what goes in).
deb: build
	MAKE="$(MAKE)" bash packaging/make-deb.sh $(PROFILE)

# The soak on the real GPU: four workloads (CUDA C++ and PyTorch) under quotas, shares and
# priorities for SOAK_SECONDS (default 540), one killed -9 and restarted every 30 s; needs the
# same .gpu/ bundle. SOAK_DRY_RUN=1 runs it here on the simulated driver (needs `cargo build`).
gpu-soak:
	bash tests/gpu/soak.sh

clean:
	$(CARGO) clean
	rm -rf .gpu
