"""Orbax checkpoints: train state + data iterator state + config + metadata.

Layout: <workdir>/checkpoints/<step>/{state, data, config, meta}. Saves are async and
atomic (Orbax writes to a temporary directory and renames it when complete), so a crash
mid-save leaves the previous checkpoint as the latest restorable one. `meta` also records
the tokenizer file the run used and, for a run started from another, its init source and,
for a model that came from Hugging Face, the source's config.json and
generation_config.json (HF_META_KEYS: passed from run to run, written back on export),
and what produced it (`provenance`: lmjax's version and git commit, package versions,
devices; lmjax/provenance.py).

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
from lmjax import provenance as provenance_lib
from lmjax.errors import UserError

FORMAT_VERSION = 1
# Meta entries holding a Hugging Face source model's config.json and generation_config.json
# (None for a model trained from scratch); each run copies its source's.
HF_META_KEYS = ('hf_config', 'hf_generation_config')


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that is missing or unreadable, or that does not fit the run; the message
  names the directory and what to do."""


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


# TensorStore's words for files it could not read (a truncated or corrupt checkpoint),
# as opposed to a checkpoint that reads fine but holds other shapes.
_STORAGE_ERRORS = ('DATA_LOSS', 'OUT_OF_RANGE', 'Error reading',
                   'is not valid for value of size')


def _storage_error(e: BaseException) -> bool:
  return any(w in str(e) for w in _STORAGE_ERRORS)


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
    self._provenance = None  # collected at the first save that is not given one

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, cfg, data_iter=None, force: bool = False,
           meta: dict | None = None) -> bool:
    """Saves (async) at `step`; `meta`: extra JSON-safe entries (e.g. {'tokenizer': path});
    without a 'provenance' entry, this process's (provenance.collect()) is recorded."""
    meta = {**_meta(cfg), **(meta or {})}
    if 'provenance' not in meta:
      if self._provenance is None:
        self._provenance = provenance_lib.collect()
      meta['provenance'] = self._provenance
    items = {
        'state': ocp.args.StandardSave(state),
        'config': ocp.args.JsonSave(config_lib.to_dict(cfg)),
        'meta': ocp.args.JsonSave(meta),
    }
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def read_config(self, step: int | None = None):
    return config_lib.from_dict(self._read_json(step, 'config'))

  def read_meta(self, step: int | None = None) -> dict:
    return self._read_json(step, 'meta')

  def _read_json(self, step: int | None, item: str) -> dict:
    step = self.resolve_step(step)
    self._check_items(step, (item,))
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.JsonRestore()}))[item]
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, item, e) from e

  def _check_items(self, step: int, items) -> None:
    """CheckpointError naming the first of `items` missing from checkpoint `step`."""
    for item in items:
      if not os.path.isdir(os.path.join(self.directory, str(step), item)):
        raise self._unreadable(step, item, FileNotFoundError(
            f'{os.path.join(self.directory, str(step), item)} is missing'))

  def _unreadable(self, step: int, item: str, e: BaseException) -> CheckpointError:
    """A checkpoint whose files are missing or corrupt: what failed, and what to do."""
    detail = str(e).strip().split('\n')[0][:300]
    earlier = [s for s in self.all_steps() if s < step]
    hint = (f'delete {self.directory}/{step} to resume from step {earlier[-1]}, the previous '
            'checkpoint' if earlier else 'there is no earlier checkpoint in this workdir')
    return CheckpointError(f'checkpoint {self.directory}/{step} is unreadable: its {item!r} '
                           f'item ({type(e).__name__}: {detail}); {hint}')

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

  def restore_params(self, abstract_params: Any, step: int | None = None,
                     key: str = 'params') -> Any:
    """Only the params (or another state entry, e.g. key='adapters') of a checkpoint (no
    optimizer state is read), placed with `abstract_params`' shardings and dtypes: a
    checkpoint of any mesh loads onto any other."""
    step = self.resolve_step(step)
    self._check_format(step)
    item = {key: abstract_params}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)
    return self._restore_state(
        step, {'state': args},
        f'the {key} of checkpoint {self.directory}/{step} do not match this model config')[key]

  def restore(self, abstract_state: Any, step: int | None = None, data_iter=None):
    """Restores into `abstract_state`'s shardings (resharding if the mesh changed)."""
    step = self.resolve_step(step)
    self._check_format(step)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._restore_state(
        step, items, f'checkpoint {self.directory}/{step} does not match this model config '
        '(different sizes, layers or tied embeddings?)')

  def _restore_state(self, step: int, items: dict, mismatch: str) -> Any:
    """The restored 'state' of `items` (Orbax args by item). Files that cannot be read
    (missing, truncated: TensorStore errors) -> _unreadable; a checkpoint that reads but
    holds other shapes or structure -> CheckpointError(mismatch: detail)."""
    self._check_items(step, items)
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))['state']
    except (ValueError, KeyError, TypeError) as e:
      if _storage_error(e):
        raise self._unreadable(step, 'state', e) from e
      raise CheckpointError(f'{mismatch}: {str(e)[:500]}') from e
    except Exception as e:  # pylint: disable=broad-except  (TensorStore: truncated files)
      raise self._unreadable(step, 'state', e) from e


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
  hf_config, hf_generation_config: the Hugging Face config.json and
    generation_config.json of the model the source came from (None if none).
  """
  path: str
  format: str            # 'lmjax' | 'hf'
  step: int | None       # lmjax: the checkpoint step read
  model: dict
  tokenizer_path: str
  hf_config: dict | None = None
  hf_generation_config: dict | None = None

  def __str__(self) -> str:
    return self.path + (f' (step {self.step})' if self.step is not None else ' (Hugging Face)')

  def load_params(self, cfg, setup) -> Any:
    """The source's params, placed with setup's param shardings (the new mesh)."""
    return self.read_params(cfg, setup.abstract_state['params'], setup.mesh, setup.rules)

  def read_params(self, cfg, abstract: Any, mesh, rules) -> Any:
    """The source's params with `abstract`'s shardings and dtypes (a LoRA run's: its base
    with its adapters merged)."""
    if self.format == 'lmjax':
      return _restore_merged(self.path, self.step, abstract)
    from lmjax import hf  # pylint: disable=import-outside-toplevel
    params = hf.load_params(self.path, cfg, mesh=mesh, rules=rules)
    params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract)
    return jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))


def _restore_merged(workdir: str, step: int | None, abstract: Any) -> Any:
  """The params of an lmjax checkpoint, restored into `abstract` (ShapeDtypeStructs with
  shardings). A LoRA run's checkpoint holds adapters only: its params are its base (the
  init_from recorded in its meta, read the same way) with the adapters merged."""
  ckpt = Checkpointer(workdir, None, read_only=True)
  try:
    step = ckpt.resolve_step(step)
    saved = ckpt.read_config(step)
    if not saved.lora.enabled:
      return ckpt.restore_params(abstract, step)
    from lmjax import sharding  # pylint: disable=import-outside-toplevel
    from lmjax.models import lora  # pylint: disable=import-outside-toplevel
    meta = ckpt.read_meta(step)
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    rules = dict(saved.rules)
    ad_sh = lora.shardings(saved, mesh, rules)
    ad_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               lora.shapes(saved), ad_sh)
    adapters = ckpt.restore_params(ad_abstract, step, key='adapters')
  finally:
    ckpt.close()
  base_ref = meta.get('init_from')
  if not base_ref:
    raise CheckpointError(f'{ckpt.directory}/{step} is a LoRA checkpoint without the '
                          'pointer to its base (meta init_from)')
  base = base_source(base_ref, ckpt.directory).read_params(saved, abstract, mesh, rules)
  param_sh = jax.tree.map(lambda a: a.sharding, abstract)
  with sharding.use_mesh(mesh, rules):
    return jax.jit(lambda p, a: lora.merge(p, a, saved), out_shardings=param_sh,
                   donate_argnums=(0,))(base, adapters)


def base_source(base_ref: dict, where: str) -> 'InitSource':
  """The InitSource a LoRA checkpoint's meta points to ({'path', 'format', 'step'})."""
  if not os.path.exists(base_ref['path']):
    raise CheckpointError(f'the base model of the LoRA checkpoint {where} is missing: '
                          f'{base_ref["path"]} (the adapters need it; restore it there)')
  step = base_ref.get('step')
  return open_init_source({'path': base_ref['path'], 'format': base_ref['format'],
                           'step': -1 if step is None else int(step)})


def open_init_source(cfg_init) -> InitSource:
  """Reads what cfg.init_from (or a dict with its path, step, format) names: config and
  metadata, no arrays yet."""
  path = os.path.abspath(os.path.expanduser(cfg_init['path']))
  fmt = detect_format(path) if cfg_init['format'] == 'auto' else cfg_init['format']
  if fmt == 'lmjax':
    source = Checkpointer(path, None, read_only=True)
    try:
      step = source.resolve_step(None if cfg_init['step'] < 0 else int(cfg_init['step']))
      saved = source.read_config(step)
      meta = source.read_meta(step)
      tokenizer = meta.get('tokenizer', '')
    finally:
      source.close()
    if 'tokenizer' not in meta:  # saved before meta recorded it: resolve it as that run did
      from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
      tokenizer = tokenizer_lib.resolve_path(saved)
    return InitSource(path, fmt, step, saved.model.to_dict(), tokenizer,
                      **{k: meta.get(k) for k in HF_META_KEYS})
  if fmt == 'hf':
    from lmjax import hf  # pylint: disable=import-outside-toplevel
    hf_config = hf.read_hf_config(path)
    model = dict(hf.model_overrides_from_hf(hf_config))
    from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    tok = path if tokenizer_lib.is_tokenizer_dir(path) else ''  # tokenizer.json / .model
    return InitSource(path, fmt, None, model, tok,
                      hf_config=hf_config, hf_generation_config=hf.read_generation_config(path))
  raise CheckpointError(f"init_from.format must be 'auto', 'lmjax' or 'hf', got {fmt!r}")


# ---- Reading a run's params for inference or export ------------------------------------

def load_params(workdir: str, step: int | None = None, mesh=None):
  """(params, cfg, meta, step) of an lmjax workdir's checkpoint (latest, or `step`), reading
  only the params (not the optimizer state), placed for `mesh` by the run's own rules.
  Default mesh: FSDP over all devices. Any training mesh restores onto any other. A LoRA
  run's params are its base with the adapters merged (see load_adapters for them alone)."""
  from lmjax import sharding  # pylint: disable=import-outside-toplevel
  from lmjax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(workdir, None, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise CheckpointError(f'no checkpoint found under {ckpt.directory}')
    step = ckpt.resolve_step(step)
    cfg, meta = ckpt.read_config(step), ckpt.read_meta(step)
  finally:
    ckpt.close()
  if mesh is None:
    mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  _, specs, shapes = state_lib.logical_param_specs(cfg)
  shardings = sharding.tree_shardings(specs, shapes, mesh, dict(cfg.rules))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  return _restore_merged(workdir, step, abstract), cfg, meta, step


def load_adapters(workdir: str, step: int | None = None, mesh=None):
  """(adapters, cfg, meta, step) of a LoRA run's checkpoint (float32, sharded for `mesh`
  by the run's rules; default all devices on fsdp)."""
  from lmjax import sharding  # pylint: disable=import-outside-toplevel
  from lmjax.models import lora  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(workdir, None, read_only=True)
  try:
    step = ckpt.resolve_step(step)
    cfg, meta = ckpt.read_config(step), ckpt.read_meta(step)
    if not cfg.lora.enabled:
      raise CheckpointError(f'{ckpt.directory}/{step} is not a LoRA run (lora.enabled is '
                            'False in its config): it has no adapters')
    if mesh is None:
      mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            lora.shapes(cfg), lora.shardings(cfg, mesh, dict(cfg.rules)))
    return ckpt.restore_params(abstract, step, key='adapters'), cfg, meta, step
  finally:
    ckpt.close()


def write_merged(workdir: str, out: str, step: int | None = None, mesh=None) -> int:
  """Writes a LoRA run's checkpoint (latest, or `step`) with the adapters merged into its
  base as a full lmjax checkpoint in `out` (params only, no optimizer state): loadable with
  lmjax.load and as another run's init_from, without the base. Returns the step."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  params, cfg, meta, step = load_params(workdir, step, mesh)
  if not cfg.lora.enabled:
    raise CheckpointError(f'{workdir} is not a LoRA run (lora.enabled is False in its '
                          'config): its checkpoints are full already')
  merged_cfg = cfg.copy_and_resolve_references()
  with merged_cfg.unlocked():
    merged_cfg.lora.enabled = False
    merged_cfg.init_from.path = ''
    merged_cfg.checkpoint.async_save = False
  ckpt = Checkpointer(out, merged_cfg)
  try:
    if ckpt.latest_step() is not None:
      raise CheckpointError(f'{ckpt.directory} has checkpoints already; choose a new --out')
    ckpt.save(step, {'step': jnp.asarray(step, jnp.int32), 'params': params}, merged_cfg,
              force=True, meta={'tokenizer': meta.get('tokenizer', ''), 'init_from': None,
                                'merged_from': {'path': os.path.abspath(workdir), 'step': step,
                                                'base': meta.get('init_from')},
                                **{k: meta.get(k) for k in HF_META_KEYS}})
    ckpt.wait()
  finally:
    ckpt.close()
  return step
