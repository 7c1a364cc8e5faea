"""What produced a run: the lmjax source (version, git commit and whether the checkout has
uncommitted changes), the versions of Python and the main packages, and the devices.

    {'lmjax': '0.1.0', 'git': {'commit': '3f2a...', 'dirty': False},   # None: not a checkout
     'python': '3.11.7', 'packages': {'jax': '0.10.2', ..., 'sentencepiece': None},
     'devices': {'kind': 'NVIDIA H200', 'count': 8, 'platform': 'gpu', 'processes': 1}}

The loop computes it once per run and records it in every checkpoint's meta
(`provenance`) and, once per start of the run (fresh or resumed), in <workdir>/run.json.
Nothing here fails a run: a missing git, a timeout or a package that is not installed
gives None.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time

import lmjax

# Distribution names, as pip knows them.
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
            'tensorflow-datasets', 'numpy', 'tokenizers', 'sentencepiece')
GIT_TIMEOUT_S = 5.0
RUN_FILE = 'run.json'


def _git(args: list[str], cwd: str) -> str | None:
  try:
    out = subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True,
                         timeout=GIT_TIMEOUT_S, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def git_state(source_dir: str | None = None) -> dict | None:
  """{'commit', 'dirty'} of the git checkout holding the lmjax package (`source_dir`:
  the folder of lmjax/__init__.py), or None where it is not one (an installed wheel, a
  package inside someone else's repository) or git cannot tell. 'dirty': tracked files
  differ from the commit (untracked files do not count)."""
  source_dir = os.path.abspath(source_dir or os.path.dirname(lmjax.__file__))
  top = _git(['rev-parse', '--show-toplevel'], source_dir)
  if not top or os.path.realpath(top) != os.path.realpath(os.path.dirname(source_dir)):
    return None
  commit = _git(['rev-parse', 'HEAD'], top)
  status = _git(['status', '--porcelain', '--untracked-files=no'], top)
  if not commit or status is None:
    return None
  return {'commit': commit, 'dirty': bool(status)}


def package_versions() -> dict[str, str | None]:
  """PACKAGES -> installed version (None: not installed)."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def collect(devices=None) -> dict:
  """This process's provenance (the module docstring's dict); `devices`: the run's (its
  mesh's), default all of jax's."""
  import jax  # pylint: disable=import-outside-toplevel
  devices = list(devices if devices is not None else jax.devices())
  return {
      'lmjax': lmjax.__version__,
      'git': git_state(),
      'python': platform.python_version(),
      'packages': package_versions(),
      'devices': {'kind': devices[0].device_kind, 'count': len(devices),
                  'platform': devices[0].platform, 'processes': jax.process_count()},
  }


def record_start(workdir: str, provenance: dict, step: int) -> None:
  """Appends {'step', 'time', 'provenance'} to the 'starts' of <workdir>/run.json: one
  entry per start of the run in this workdir (step 0, or the checkpoint it resumed from).
  Call on one process only."""
  path = os.path.join(workdir, RUN_FILE)
  record = {'starts': []}
  if os.path.exists(path):
    try:
      with open(path, encoding='utf-8') as f:
        record = json.load(f)
    except (OSError, ValueError):  # unreadable: start the list again rather than fail
      record = {'starts': []}
  record.setdefault('starts', []).append(
      {'step': int(step), 'time': time.time(), 'provenance': provenance})
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


def read_starts(workdir: str) -> list[dict]:
  """The 'starts' of <workdir>/run.json ([] when there is none)."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return json.load(f).get('starts', [])
