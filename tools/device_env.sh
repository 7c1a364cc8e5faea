# Sourced by tools/gpu_check.sh and tools/tpu_check.sh from the repository root: installs
# the wheels in $WHEELS (default .whl/; tools/fetch_device_wheels.sh fetches them where
# PyPI is reachable) into /tmp/site for a machine without internet access, and puts this
# checkout and them on PYTHONPATH.
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
