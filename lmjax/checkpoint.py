"""Orbax checkpoints: train state + data iterator state + config + metadata.

Layout: <workdir>/checkpoints/<step>/{state, data, config, meta}. Saves are async and
atomic (Orbax writes to a temporary directory and renames it when complete), so a crash
mid-save leaves the previous checkpoint as the latest restorable one. `meta` also records
the tokenizer file the run used and, for a run started from another, its init source and,
for a model that came from Hugging Face, the source's config.json and
generation_config.json (HF_META_KEYS: passed from run to run, written back on export),
and what produced it (`provenance`: lmjax's version and git commit, package versions,
devices; lmjax/provenance.py).

Reading a run's params (an init_from source, a LoRA run merged onto its base, a Hugging
Face model) is lmjax/weights.py's.
"""

from __future__ import annotations

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
