"""Copies stock Keras' own saving tests into tests/stock_suites/ (the copies are committed).

    .venv/bin/python tests/stock_suites/fetch_suites.py            # (re)write the copies
    .venv/bin/python tests/stock_suites/fetch_suites.py --check    # exit 1 if a copy differs

Sources:
  * tf_keras 2.21.0 (the wheel ships no tests): four files read with `git show v2.21.0:<path>` from
    a local mirror of github.com/keras-team/tf-keras (`--mirror`, default
    /work/.mirror/keras-team+tf-keras/repo). The only change is the import rewrite below.
  * Keras 3.15.1: keras/src/saving/saving_api_test.py as installed by the keras wheel, checked
    against the sha256 in the wheel's RECORD; copied unchanged.

The import rewrite: the wheel moves the source tree's `tf_keras/` package to `tf_keras/src/` and puts
the generated public API at `tf_keras/` (its `tf_keras.layers` lacks e.g. `CuDNNGRU`, which the
source tree's has and the tests use). So every `from tf_keras.X import` / `import tf_keras.X`
becomes `tf_keras.src.X`, except `tf_keras.protobuf`, which the wheel keeps at the top level;
`from tf_keras import X` becomes `from tf_keras.src import X`; and `import tf_keras as keras`
becomes `import tf_keras.src as keras` (the source tree's root package; `keras.Model` is the same
class either way). Nothing else is touched (license headers included),
so `git show v2.21.0:<path> | diff - tests/stock_suites/tf_keras/<name>` shows only import lines.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
TF_KERAS_TAG = "v2.21.0"
TF_KERAS_FILES = (
    "tf_keras/saving/legacy/save_test.py",
    "tf_keras/saving/legacy/save_weights_test.py",
    "tf_keras/saving/legacy/saved_model/saved_model_test.py",
    "tf_keras/saving/saving_lib_test.py",
)
KERAS_VERSION = "3.15.1"
KERAS_FILE = "keras/src/saving/saving_api_test.py"
# Subpackages the tf_keras wheel keeps at the top level (tf_keras/protobuf/*_pb2.py).
_TOP_LEVEL = ("protobuf",)
_IMPORT = re.compile(r"^(\s*(?:from|import)\s+)tf_keras\.(\w+)", re.MULTILINE)
_FROM_ROOT = re.compile(r"^([ \t]*from[ \t]+)tf_keras([ \t]+import[ \t])", re.MULTILINE)
_IMPORT_ROOT = re.compile(r"^([ \t]*import[ \t]+)tf_keras([ \t]+as[ \t]+\w+[ \t]*)$", re.MULTILINE)


def rewrite_imports(source: str) -> str:
    def repl(match: re.Match) -> str:
        head, sub = match.group(1), match.group(2)
        if sub in _TOP_LEVEL or sub == "src":
            return match.group(0)
        return f"{head}tf_keras.src.{sub}"

    source = _IMPORT.sub(repl, source)
    source = _FROM_ROOT.sub(r"\1tf_keras.src\2", source)
    return _IMPORT_ROOT.sub(r"\1tf_keras.src\2", source)


def tf_keras_sources(mirror: pathlib.Path) -> dict[pathlib.Path, bytes]:
    out = {}
    for path in TF_KERAS_FILES:
        blob = subprocess.run(
            ["git", "-C", str(mirror), "show", f"{TF_KERAS_TAG}:{path}"], check=True, capture_output=True
        ).stdout
        out[HERE / "tf_keras" / pathlib.Path(path).name] = rewrite_imports(blob.decode("utf-8")).encode("utf-8")
    return out


def keras_source() -> dict[pathlib.Path, bytes]:
    dist = importlib.metadata.distribution("keras")
    if dist.version != KERAS_VERSION:
        sys.exit(f"installed keras is {dist.version}, expected {KERAS_VERSION}")
    record = {f.as_posix(): f for f in dist.files or ()}
    entry = record.get(KERAS_FILE)
    if entry is None or entry.hash is None:
        sys.exit(f"{KERAS_FILE} is not in the keras wheel's RECORD")
    data = entry.locate().read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if digest != entry.hash.value:
        sys.exit(f"installed {KERAS_FILE} does not match the wheel's RECORD (modified?)")
    return {HERE / "keras3" / pathlib.Path(KERAS_FILE).name: data}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", default="/work/.mirror/keras-team+tf-keras/repo", type=pathlib.Path)
    parser.add_argument("--check", action="store_true", help="compare the committed copies, write nothing")
    args = parser.parse_args()
    files = {**tf_keras_sources(args.mirror), **keras_source()}
    stale = []
    for path, data in files.items():
        current = path.read_bytes() if path.exists() else None
        if current == data:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for path in stale:
        print(f"{'differs' if args.check else 'wrote'}: {path.relative_to(HERE)}")
    if not stale:
        print("all copies up to date")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
