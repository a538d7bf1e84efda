#!/usr/bin/env bash
# `make compat`: the interop tests against each supported Keras 3 minor release (and tf_keras
# releases where they install on this TensorFlow). One small venv per release, holding only that
# Keras (pure Python) and seeing everything else -- TensorFlow, h5py, the built kerassave_fast --
# through the project's venv. Prints one line per release; the full logs are in .compat/logs/.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
python="$root/.venv/bin/python"
site=$("$python" -c 'import site; print(site.getsitepackages()[0])')
keras_releases="${KERAS_RELEASES:-3.10.0 3.11.3 3.12.4 3.13.2 3.14.1 3.15.1}"
tf_keras_releases="${TF_KERAS_RELEASES:-2.16.0 2.17.0 2.18.0 2.19.0 2.20.1 2.21.0}"
tests="${COMPAT_TESTS:-tests/test_interop.py tests/test_weights_file.py tests/test_legacy_h5.py}"
tf_keras_tests="${COMPAT_TF_KERAS_TESTS:-tests/test_tf_checkpoint.py tests/test_tf_saved_model.py tests/test_legacy_h5.py}"
mkdir -p .compat/logs
status=0

# A venv whose own site-packages come first, then the project's (run through site.addsitedir so
# its .pth files, the editable kerassave_fast among them, are honoured).
make_venv() {
    local dir=$1 package=$2
    if [ ! -x "$dir/bin/python" ]; then
        "$python" -m venv "$dir" || return 1
        local own
        own=$("$dir/bin/python" -c 'import site; print(site.getsitepackages()[0])')
        echo "import site; site.addsitedir('$site')" > "$own/zz_kerassave_fast_project.pth"
    fi
    "$dir/bin/python" -m pip install --quiet --no-deps "$package"
}

run() {
    local name=$1 package=$2 module=$3 tests=$4
    local dir=".compat/$name" log=".compat/logs/$name.log"
    if ! make_venv "$dir" "$package" >"$log" 2>&1; then
        echo "$name: not installable here (see $log)"
        return
    fi
    local version
    version=$("$dir/bin/python" -c "import $module; print($module.__version__)" 2>>"$log")
    # A Keras 3 release without every private piece the fast paths use runs through stock.
    if [ "$module" = keras ] && ! "$dir/bin/python" -c \
        'import sys; from kerassave_fast.keras3 import hooks; sys.exit(bool(hooks.missing()))' 2>>"$log"; then
        if "$dir/bin/python" tests/compat/fallback_check.py >>"$log" 2>&1; then
            echo "$name ($module $version): $(tail -1 "$log")"
        else
            echo "$name ($module $version): FAILED -- $(tail -1 "$log")"
            status=1
        fi
        return
    fi
    # shellcheck disable=SC2086
    if (cd "$root" && "$dir/bin/python" -m pytest -q -p no:cacheprovider $tests >>"$log" 2>&1); then
        echo "$name ($module $version): passed -- $(tail -1 "$log")"
    else
        echo "$name ($module $version): FAILED -- $(tail -1 "$log")"
        status=1
    fi
}

for release in $keras_releases; do
    run "keras-$release" "keras==$release" keras "$tests"
done
for release in $tf_keras_releases; do
    run "tf_keras-$release" "tf-keras==$release" tf_keras "$tf_keras_tests"
done
exit $status
