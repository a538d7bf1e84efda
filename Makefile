# The README's two commands: `make test` and `make bench`. Each sets up .venv when missing.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.extension-built
RUST_SOURCES := $(wildcard rust/*.rs rust/*/*.rs) Cargo.toml Cargo.lock

.PHONY: native-tools test bench bench-compression bench-saved-model bench-adoption bench-mapped build lint fmt clean stock-suites fuzz corpus compat

$(DEPS): requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $@

# ISA-L (the isal-sys crate) is built from source with nasm and autotools: installed here when
# missing on a Debian machine where we are root, else named in an error.
NATIVE_TOOLS := nasm autoconf automake libtoolize
native-tools:
	@missing=""; for t in $(NATIVE_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing nasm autoconf automake libtool (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nasm autoconf automake libtool >/dev/null; \
	  else echo "building needs$$missing: install nasm, autoconf, automake and libtool" >&2; exit 1; fi; \
	fi

# The Rust extension, built in release mode and installed (editable) into the venv.
$(BUILT): $(DEPS) $(RUST_SOURCES) pyproject.toml | native-tools
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release --quiet
	touch $@

build: $(BUILT)

test: $(BUILT)
	cargo test --release --quiet
	$(PYTHON) -m pytest

# Benchmark on the built-in default model, then compressed weights files, tf_keras SavedModels,
# background saves / install() / the command line, and mapped loads of a 3.2 GB model; writes
# benches/results/. BENCH_ARGS, COMPRESSION_ARGS, SAVED_MODEL_ARGS, ADOPTION_ARGS and MAPPED_ARGS pass
# options (`make bench-compression`, `bench-saved-model`, `bench-adoption`, `bench-mapped` run one part).
bench: $(BUILT)
	$(PYTHON) benches/run.py $(BENCH_ARGS)
	$(PYTHON) benches/compression.py $(COMPRESSION_ARGS)
	$(PYTHON) benches/saved_model.py $(SAVED_MODEL_ARGS)
	$(PYTHON) benches/adoption.py $(ADOPTION_ARGS)
	$(PYTHON) benches/mapped.py $(MAPPED_ARGS)

bench-compression: $(BUILT)
	$(PYTHON) benches/compression.py $(COMPRESSION_ARGS)

bench-saved-model: $(BUILT)
	$(PYTHON) benches/saved_model.py $(SAVED_MODEL_ARGS)

bench-adoption: $(BUILT)
	$(PYTHON) benches/adoption.py $(ADOPTION_ARGS)

bench-mapped: $(BUILT)
	$(PYTHON) benches/mapped.py $(MAPPED_ARGS)

# Stock's own saving tests, on stock and with kerassave_fast.install(), diffed (~25 min; not in CI).
stock-suites: $(BUILT)
	$(PYTHON) tests/stock_suites/compare.py $(SUITES_ARGS)

# The hostile-file corpora of tests/test_robustness.py at CORPUS_FILES files per format (~1 h; not in CI).
CORPUS_FILES ?= 10000
corpus: $(BUILT)
	KSF_CORPUS_FILES=$(CORPUS_FILES) $(PYTHON) -m pytest tests/test_robustness.py -k mutated -s -p no:cacheprovider

# The interop tests on each Keras 3 minor release 3.10-3.15 and tf_keras 2.16-2.21 (~30 min; not in CI).
compat: $(BUILT)
	bash tests/compat/run.sh

# Coverage-guided fuzzing of the Rust parsers, FUZZ_SECONDS each (default 300; nightly + cargo-fuzz; not in CI).
fuzz:
	bash fuzz/run.sh

lint: $(DEPS) | native-tools
	cargo fmt --check
	cargo clippy --release --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

fmt: $(DEPS)
	cargo fmt
	$(VENV)/bin/ruff format python tests benches

clean:
	rm -rf $(VENV) target
