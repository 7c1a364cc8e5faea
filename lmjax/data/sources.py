"""Text sources: a local TFDS builder for globs of text files, and TFDS by name.

Both end as random-access TFDS data sources (array_record; no TensorFlow needed) that a
grain pipeline reads. The default corpus, `text_glob='stdlib'`, is every .py file of
this Python's standard library: real code and prose, present on every machine, nothing
downloaded.
"""

from __future__ import annotations

import glob as glob_lib
import hashlib
import os
import sysconfig
from typing import Iterator

import tensorflow_datasets as tfds
from absl import logging as absl_logging

STDLIB = 'stdlib'


class DataError(ValueError):
  """Bad data configuration or input; the message names the field or file."""


def default_data_dir(cfg_data) -> str:
  return os.path.expanduser(cfg_data.data_dir or '~/.cache/lmjax/tfds')


def stdlib_files() -> tuple[str, list[str]]:
  """(root, sorted .py files of the standard library, site-packages excluded)."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for path in glob_lib.glob(os.path.join(root, '**', '*.py'), recursive=True):
    rel = os.path.relpath(path, root)
    if 'site-packages' in rel.split(os.sep) or 'dist-packages' in rel.split(os.sep):
      continue
    files.append(path)
  return root, sorted(files)


def resolve_glob(text_glob: str) -> tuple[str, list[str]]:
  """(root the split hash is computed against, sorted matching files)."""
  if text_glob == STDLIB:
    return stdlib_files()
  pattern = os.path.expanduser(text_glob)
  files = sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
  if not files:
    raise DataError(f'data.text_glob {text_glob!r} matches no files')
  root = os.path.commonpath([os.path.dirname(p) for p in files])
  return root, files


def dataset_name(text_glob: str) -> str:
  if text_glob == STDLIB:
    return STDLIB
  return 'glob_' + hashlib.sha256(os.path.expanduser(text_glob).encode()).hexdigest()[:8]


def is_validation(rel_path: str, val_fraction: float) -> bool:
  """Stable split by path: the same file lands in the same split on every machine."""
  h = int.from_bytes(hashlib.sha256(rel_path.encode('utf-8')).digest()[:8], 'big')
  return h / 2**64 < val_fraction


def split_files(root: str, files: list[str], val_fraction: float) -> dict[str, list[str]]:
  rels = [os.path.relpath(p, root) for p in files]
  val = [p for p, r in zip(files, rels) if is_validation(r, val_fraction)]
  if not val and len(files) >= 2 and val_fraction > 0:
    # Tiny corpora: hold out the file with the smallest hash so validation is never empty.
    key = lambda p: hashlib.sha256(os.path.relpath(p, root).encode()).digest()
    val = [min(files, key=key)]
  val_set = set(val)
  return {'train': [p for p in files if p not in val_set], 'validation': val}


class LocalTextConfig(tfds.core.BuilderConfig):

  def __init__(self, *, text_glob: str, val_fraction: float, **kwargs):
    super().__init__(name=dataset_name(text_glob), version='1.0.0',
                     description=f'text files matching {text_glob!r}', **kwargs)
    self.text_glob = text_glob
    self.val_fraction = val_fraction


class LocalText(tfds.core.GeneratorBasedBuilder):
  """One example per UTF-8 text file; train/validation split by a hash of the path."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Local text files, one document per file.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'path': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    root, files = resolve_glob(self.builder_config.text_glob)
    splits = split_files(root, files, self.builder_config.val_fraction)
    return {name: self._generate_examples(root, paths) for name, paths in splits.items()}

  def _generate_examples(self, root, paths):
    for path in paths:
      rel = os.path.relpath(path, root)
      try:
        with open(path, encoding='utf-8') as f:
          text = f.read()
      except UnicodeDecodeError:
        continue  # not text; skipped (the dataset's example count shows it)
      if text.strip():
        yield rel, {'text': text, 'path': rel}


def local_text_builder(cfg_data) -> LocalText:
  """The builder for cfg.data.text_glob, prepared on first use (atomic: TFDS writes to an
  incomplete directory and renames it when done)."""
  config = LocalTextConfig(text_glob=cfg_data.text_glob, val_fraction=cfg_data.val_fraction)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS logs every step at INFO/WARNING
  try:
    builder = LocalText(config=config, data_dir=default_data_dir(cfg_data),
                        file_format='array_record')
    if not builder.is_prepared():
      resolve_glob(cfg_data.text_glob)  # clear error before TFDS starts
      print(f'lmjax: building dataset {config.name!r} from {cfg_data.text_glob!r} '
            f'into {builder.data_dir}', flush=True)
      tfds.disable_progress_bar()
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False))
  finally:
    absl_logging.set_verbosity(verbosity)
  return builder


class _TextSource:
  """Random-access source of str documents over a TFDS data source."""

  def __init__(self, source, key: str, name: str):
    self._source = source
    self._key = key
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    record = self._source[index]
    if self._key not in record:
      raise DataError(f'{self.name}: records have no field data.text_key={self._key!r} '
                      f'(fields: {sorted(record)})')
    text = record[self._key]
    return text.decode('utf-8') if isinstance(text, bytes) else str(text)

  def __repr__(self) -> str:
    return f'TextSource({self.name}, {len(self)} documents)'


def get_source(cfg_data, split: str) -> _TextSource:
  """Random-access str documents of `split` for cfg.data (building local data if needed)."""
  if cfg_data.source == 'local_text':
    builder = local_text_builder(cfg_data)
    name = f'local_text/{builder.builder_config.name}'
    if split not in builder.info.splits:
      raise DataError(f'{name} has no split {split!r} (has {sorted(builder.info.splits)}); '
                      'check data.train_split / data.eval_split')
    source = builder.as_data_source(split=split)
    key = 'text'
  elif cfg_data.source == 'tfds':
    name = cfg_data.tfds_name
    try:
      builder = tfds.builder(name, data_dir=cfg_data.data_dir or None)
    except Exception as e:  # tfds raises several types for unknown names
      raise DataError(f'data.tfds_name {name!r}: {e}') from e
    if not builder.is_prepared():
      raise DataError(f'data.tfds_name {name!r} is not prepared under {builder.data_dir} '
                      '(lmjax never downloads at run time: build it in array_record format first)')
    if split not in builder.info.splits:
      raise DataError(f'{name} has no split {split!r} (has {sorted(builder.info.splits)})')
    source = builder.as_data_source(split=split)
    key = cfg_data.text_key
  else:
    raise DataError(f'unknown data.source {cfg_data.source!r}')
  if len(source) == 0:
    raise DataError(f'{name} split {split!r} is empty')
  return _TextSource(source, key, f'{name}[{split}]')


def iter_texts(cfg_data, split: str, max_docs: int | None = None) -> Iterator[str]:
  source = get_source(cfg_data, split)
  n = len(source) if max_docs is None else min(max_docs, len(source))
  for i in range(n):
    yield source[i]
