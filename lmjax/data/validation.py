"""Checks of cfg.data (its single source and its named sources) that involve several
fields; lmjax.config.validate calls them. The chat data groups (cfg.sft, cfg.dpo) are
checked by their objectives (lmjax/train/objectives).
Unknown keys and wrong types never get here: the locked base config refuses them.

Standard library only (and lmjax.config): a config is checked before jax or a data
library is imported.
"""

from __future__ import annotations

import ml_collections

from lmjax.config import (_CHOICES, _NAME, CORPUS_FORMATS, SOURCE_FIELDS, SOURCE_GROUPS,
                          ConfigError, apply_overrides, data_source, resolve_source)


def validate(cfg) -> None:
  """cfg.data: the single source, data.seq_len, and the named sources."""
  for group in SOURCE_GROUPS:
    _check_sources(f'data.{group}', cfg.data[group])
  if cfg.data.seq_len < 2:
    raise ConfigError(f'data.seq_len must be >= 2, got {cfg.data.seq_len}')
  if cfg.data.source == 'tfds' and not cfg.data.tfds_name and not cfg.data.mixture:
    raise ConfigError("data.tfds_name must be set when data.source='tfds'")
  if (cfg.data.source in CORPUS_FORMATS and not cfg.data.files.strip()
      and not cfg.data.mixture):
    raise ConfigError(f'data.files must name the shards when data.source='
                      f"{cfg.data.source!r} (globs separated by commas)")
  _validate_sources(cfg)


def _check_sources(key: str, group) -> None:
  """The named entries of data.mixture / data.eval_sources (a config file may set them
  to plain dicts): names, and the fields of data_source() (ml_collections checks those,
  by updating a data_source() with each entry)."""
  if not isinstance(group, ml_collections.ConfigDict):
    raise ConfigError(f'config key {key!r} must be a group of named sources, got {group!r}')
  for name, entry in group.items():
    where = f'{key}.{name}'
    if not _NAME.match(name):
      raise ConfigError(f'{where}: a source name must be a letter then letters, digits '
                        'or _ (it is used in metric names and command-line keys)')
    if not isinstance(entry, ml_collections.ConfigDict):
      raise ConfigError(f'config key {where!r} must be a group built with '
                        f'lmjax.config.data_source(...), got {entry!r}')
    try:
      apply_overrides(data_source(), dict(entry.items()))
    except ConfigError as e:
      raise ConfigError(f'{where}: {e}') from None
    missing = [f for f in SOURCE_FIELDS if f not in entry]
    if missing:
      raise ConfigError(f'{where} lacks the fields {", ".join(missing)}: build it with '
                        'lmjax.config.data_source(...)')


def _validate_sources(cfg) -> None:
  d = cfg.data
  both = set(d.mixture) & set(d.eval_sources)
  if both:
    raise ConfigError(f'data.eval_sources.{sorted(both)[0]} has the name of a data.mixture '
                      'source (each mixture source is evaluated already)')
  for group in SOURCE_GROUPS:
    for name, entry in d[group].items():
      where = f'data.{group}.{name}'
      if group == 'mixture' and not entry.weight > 0:
        raise ConfigError(f'{where}.weight must be positive, got {entry.weight}')
      if entry.source and entry.source not in _CHOICES['data.source']:
        raise ConfigError(f'config key {where + ".source"!r} must be one of '
                          f"{('',) + _CHOICES['data.source']}, got {entry.source!r}")
      if entry.val_fraction != -1 and not 0 <= entry.val_fraction < 1:
        raise ConfigError(f'{where}.val_fraction must be in [0, 1) (or -1: data.val_fraction)'
                          f', got {entry.val_fraction}')
      if entry.on_error and entry.on_error not in _CHOICES['data.on_error']:
        raise ConfigError(f'config key {where + ".on_error"!r} must be one of '
                          f"{('',) + _CHOICES['data.on_error']}, got {entry.on_error!r}")
      resolved = resolve_source(d, entry)
      if resolved.source == 'tfds' and not resolved.tfds_name:
        raise ConfigError(f"{where}.tfds_name must be set: its source is 'tfds'")
      if resolved.source in CORPUS_FORMATS and not resolved.files:
        raise ConfigError(f'{where}.files must be set: its source is {resolved.source!r}')
