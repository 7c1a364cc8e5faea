"""Orbax checkpoints: train state + data iterator state + config + metadata.

Layout: <workdir>/checkpoints/<step>/{state, data, config, meta}. Saves are async and
atomic (Orbax writes to a temporary directory and renames it when complete), so a crash
mid-save leaves the previous checkpoint as the latest restorable one.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lmjax import config as config_lib

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
  pass


def _meta(cfg) -> dict:
  return {'format_version': FORMAT_VERSION, 'layers': 'stacked',
          'scan_layers': bool(cfg.model.scan_layers)}


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` that knows lmjax's items."""

  def __init__(self, workdir: str, cfg, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.checkpoint.keep if cfg is not None else None,
        enable_async_checkpointing=bool(cfg.checkpoint.async_save) if cfg is not None else False,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, cfg, data_iter=None, force: bool = False) -> bool:
    items = {
        'state': ocp.args.StandardSave(state),
        'config': ocp.args.JsonSave(config_lib.to_dict(cfg)),
        'meta': ocp.args.JsonSave(_meta(cfg)),
    }
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def read_config(self, step: int | None = None):
    step = self._resolve(step)
    d = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(d['config'])

  def read_meta(self, step: int | None = None) -> dict:
    step = self._resolve(step)
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def _resolve(self, step):
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f'no checkpoint found under {self.directory}')
    if step not in self.all_steps():
      raise CheckpointError(f'no checkpoint for step {step} under {self.directory}; '
                            f'available: {self.all_steps()}')
    return step

  def restore(self, abstract_state: Any, step: int | None = None, data_iter=None):
    """Restores into `abstract_state`'s shardings (resharding if the mesh changed)."""
    step = self._resolve(step)
    meta = self.read_meta(step)
    if meta.get('format_version') != FORMAT_VERSION:
      raise CheckpointError(f'checkpoint {self.directory}/{step} has format '
                            f'{meta.get("format_version")}, this lmjax reads {FORMAT_VERSION}')
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
