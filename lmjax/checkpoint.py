"""Orbax checkpoints: train state + data iterator state + config + metadata.

Layout: <workdir>/checkpoints/<step>/{state, data, config, meta}. Saves are async and
atomic (Orbax writes to a temporary directory and renames it when complete), so a crash
mid-save leaves the previous checkpoint as the latest restorable one. `meta` also records
the tokenizer file the run used and, for a run started from another, its init source.

`InitSource` reads the params a new run starts from (cfg.init_from): another lmjax
workdir's checkpoint, restored straight into the new run's shardings (any mesh), or a
Hugging Face model directory (through lmjax.hf).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lmjax import config as config_lib

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
  pass


class _DropReadOnlyNotice(logging.Filter):
  """Orbax warns on every read-only manager (each inference load or init_from source)."""

  def filter(self, record):
    msg = record.getMessage()
    return not (msg.startswith('Given directory is read only')
                or msg.startswith('CheckpointManagerOptions.read_only=True'))


logging.getLogger('absl').addFilter(_DropReadOnlyNotice())


def _meta(cfg) -> dict:
  return {'format_version': FORMAT_VERSION, 'layers': 'stacked',
          'scan_layers': bool(cfg.model.scan_layers)}


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` that knows lmjax's items."""

  def __init__(self, workdir: str, cfg, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.checkpoint.keep if cfg is not None and not read_only else None,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=bool(cfg.checkpoint.async_save) if cfg is not None else False,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, cfg, data_iter=None, force: bool = False,
           meta: dict | None = None) -> bool:
    """Saves (async) at `step`; `meta`: extra JSON-safe entries (e.g. {'tokenizer': path})."""
    items = {
        'state': ocp.args.StandardSave(state),
        'config': ocp.args.JsonSave(config_lib.to_dict(cfg)),
        'meta': ocp.args.JsonSave({**_meta(cfg), **(meta or {})}),
    }
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def read_config(self, step: int | None = None):
    step = self.resolve_step(step)
    d = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(d['config'])

  def read_meta(self, step: int | None = None) -> dict:
    step = self.resolve_step(step)
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def resolve_step(self, step: int | None = None) -> int:
    """`step`, checked to exist; None = the latest."""
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f'no checkpoint found under {self.directory}')
    if step not in self.all_steps():
      raise CheckpointError(f'no checkpoint for step {step} under {self.directory}; '
                            f'available: {self.all_steps()}')
    return step

  def _check_format(self, step: int) -> None:
    meta = self.read_meta(step)
    if meta.get('format_version') != FORMAT_VERSION:
      raise CheckpointError(f'checkpoint {self.directory}/{step} has format '
                            f'{meta.get("format_version")}, this lmjax reads {FORMAT_VERSION}')

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    """Only the params of a checkpoint (no optimizer state is read), placed with
    `abstract_params`' shardings: a checkpoint of any mesh loads onto any other."""
    step = self.resolve_step(step)
    self._check_format(step)
    item = {'params': abstract_params}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=args))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f'the params of checkpoint {self.directory}/{step} do not match '
                            f'this model config: {str(e)[:500]}') from e
    return out['state']['params']

  def restore(self, abstract_state: Any, step: int | None = None, data_iter=None):
    """Restores into `abstract_state`'s shardings (resharding if the mesh changed)."""
    step = self.resolve_step(step)
    self._check_format(step)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} does not match this model config '
          f'(different sizes, layers or tied embeddings?): {str(e)[:500]}') from e
    return out['state']


# ---- Starting from another run (cfg.init_from) ------------------------------------------

def is_hf_dir(path: str) -> bool:
  """A Hugging Face model directory: config.json + *.safetensors."""
  return (os.path.isfile(os.path.join(path, 'config.json'))
          and bool(glob.glob(os.path.join(path, '*.safetensors'))))


def detect_format(path: str) -> str:
  """'lmjax' (a workdir with checkpoints/) or 'hf' (config.json + *.safetensors)."""
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return 'lmjax'
  if is_hf_dir(path):
    return 'hf'
  if not os.path.exists(path):
    raise CheckpointError(f'init_from.path {path!r} does not exist')
  raise CheckpointError(f'init_from.path {path!r} is neither an lmjax workdir (with '
                        'checkpoints/) nor a Hugging Face model dir (config.json + '
                        '*.safetensors)')


@dataclasses.dataclass
class InitSource:
  """The run a new run starts from: where it is, and what its params and tokenizer are.

  model: the source's model fields (those it defines), to check against the new config.
  tokenizer_path: the tokenizer the source was trained with ('' if it names none).
  """
  path: str
  format: str            # 'lmjax' | 'hf'
  step: int | None       # lmjax: the checkpoint step read
  model: dict
  tokenizer_path: str

  def __str__(self) -> str:
    return self.path + (f' (step {self.step})' if self.step is not None else ' (Hugging Face)')

  def load_params(self, cfg, setup) -> Any:
    """The source's params, placed with setup's param shardings (the new mesh)."""
    abstract = setup.abstract_state['params']
    if self.format == 'lmjax':
      source = Checkpointer(self.path, None, read_only=True)
      try:
        return source.restore_params(abstract, self.step)
      finally:
        source.close()
    from lmjax import hf  # pylint: disable=import-outside-toplevel
    params = hf.load_params(self.path, cfg, mesh=setup.mesh, rules=setup.rules)
    return jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))


def open_init_source(cfg_init) -> InitSource:
  """Reads what cfg.init_from names (config, metadata; no arrays yet)."""
  path = os.path.abspath(os.path.expanduser(cfg_init.path))
  fmt = detect_format(path) if cfg_init.format == 'auto' else cfg_init.format
  if fmt == 'lmjax':
    source = Checkpointer(path, None, read_only=True)
    try:
      step = source.resolve_step(None if cfg_init.step < 0 else int(cfg_init.step))
      saved = source.read_config(step)
      tokenizer = source.read_meta(step).get('tokenizer', '')
    finally:
      source.close()
    if not tokenizer:  # saved before meta recorded it: resolve it as that run did
      from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
      tokenizer = tokenizer_lib.resolve_path(saved)
    return InitSource(path, fmt, step, saved.model.to_dict(), tokenizer)
  if fmt == 'hf':
    from lmjax import hf  # pylint: disable=import-outside-toplevel
    model = dict(hf.model_overrides_from_hf(hf.read_hf_config(path)))
    tok = os.path.join(path, 'tokenizer.model')
    return InitSource(path, fmt, None, model, tok if os.path.exists(tok) else '')
  raise CheckpointError(f"init_from.format must be 'auto', 'lmjax' or 'hf', got {fmt!r}")


# ---- Reading a run's params for inference or export ------------------------------------

def load_params(workdir: str, step: int | None = None, mesh=None):
  """(params, cfg, meta, step) of an lmjax workdir's checkpoint (latest, or `step`), reading
  only the params (not the optimizer state), placed for `mesh` by the run's own rules.
  Default mesh: FSDP over all devices. Any training mesh restores onto any other."""
  from lmjax import sharding  # pylint: disable=import-outside-toplevel
  from lmjax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(workdir, None, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise CheckpointError(f'no checkpoint found under {ckpt.directory}')
    step = ckpt.resolve_step(step)
    cfg, meta = ckpt.read_config(step), ckpt.read_meta(step)
    if mesh is None:
      mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
    _, specs, shapes = state_lib.logical_param_specs(cfg)
    shardings = sharding.tree_shardings(specs, shapes, mesh, dict(cfg.rules))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    params = ckpt.restore_params(abstract, step)
  finally:
    ckpt.close()
  return params, cfg, meta, step
