#!/usr/bin/env bash
# `make fuzz`: each fuzz target for FUZZ_SECONDS (default 300), seeded with the test fixtures,
# then one line per target with its executions. Needs the nightly toolchain and cargo-fuzz, which
# this installs when missing. Crashes are kept in fuzz/artifacts/<target>/ and fail the run.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-300}"
targets="${FUZZ_TARGETS:-zip_directory hdf5_listing bundle_index}"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Seeds: the fixtures the Rust tests use, and a small .keras-like zip around one of them.
mkdir -p corpus/zip_directory corpus/hdf5_listing corpus/bundle_index logs
cp ../rust/hdf5/testdata/keras_like.h5 corpus/hdf5_listing/
cp ../rust/bundle/testdata/checkpoint.index corpus/bundle_index/
python3 - <<'PY'
import zipfile
with zipfile.ZipFile("corpus/zip_directory/seed.keras", "w") as zf:
    zf.writestr("metadata.json", '{"keras_version": "3"}', zipfile.ZIP_DEFLATED)
    zf.write("../rust/hdf5/testdata/keras_like.h5", "model.weights.h5", zipfile.ZIP_STORED)
PY

status=0
for target in $targets; do
    log="logs/$target.log"
    if ! cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 \
        -timeout=10 >"$log" 2>&1; then
        status=1
    fi
    runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1 || true)
    echo "$target: ${runs:-FAILED (see fuzz/$log)}"
done
exit $status
