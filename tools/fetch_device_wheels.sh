#!/usr/bin/env bash
# Optional helper for a GPU machine without internet access: wheels of what lmjax needs
# beyond a typical CUDA jax image (Python 3.12 with jax, flax, optax, orbax, sentencepiece,
# numpy, ...; not grain, ml_collections, tensorflow-datasets and their few own needs), at
# the versions installed here, into .whl/ (ignored through .git/info/exclude), which
# tools/gpu_check.sh installs. Run where PyPI is reachable, then copy .whl/ along:
#   bash tools/fetch_device_wheels.sh      # ~11 MB
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# The closure of grain, ml-collections, tensorflow-datasets, array-record, datasketch and
# tensorboardX's requirements, less what the device image already has.
PKGS="array-record datasketch dm-tree docstring-parser googleapis-common-protos grain
immutabledict importlib-resources ml-collections portpicker simple-parsing tensorboardX
tensorflow-datasets tensorflow-metadata termcolor toml"
version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
for p in $PKGS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$p==$(version "$p")"
done
# promise (tensorflow-datasets imports it) is published as a source archive only: pure
# Python, so a wheel built here installs there.
python3 -m pip wheel -q --no-deps -w .whl "promise==$(version promise)" 2>/dev/null
ls .whl
du -sh .whl
