"""Text sources: a local TFDS builder for globs of text files, TFDS datasets by name, and
corpora of records in their own formats (JSONL, Parquet, save_to_disk: data/corpora.py).

All end as random-access sources of str documents (TFDS array_record data sources, no
TensorFlow needed; or the corpora's indexed shards) that the grain pipeline reads. The default corpus, text_glob='stdlib',
is every .py file of this Python's standard library: real code and prose, present on
every machine, nothing downloaded. text_glob='site:jax,flax,optax' names the installed
sources of Python packages the same way (a second corpus on every machine with lmjax).

    src = get_source(cfg.data, 'train')    # builds the local dataset on first use
    len(src), src[0][:80]
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob as glob_lib
import hashlib
import importlib.util
import io
import logging
import os
import sysconfig
import time
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from lmjax.errors import UserError

STDLIB = 'stdlib'
SITE = 'site:'  # 'site:pkg1,pkg2': the .py files of these installed packages.
DEFAULT_VAL_FRACTION = 0.02  # base_config's data.val_fraction: keeps the plain name.
SPLITS = ('train', 'validation')


class DataError(UserError, ValueError):
  """Bad data configuration or input; the message names the config field or the path."""


def default_data_dir(cfg_data) -> str:
  """cfg.data.data_dir, or ~/.cache/lmjax/tfds (expanded)."""
  return os.path.expanduser(cfg_data.data_dir or '~/.cache/lmjax/tfds')


# ---- Files and splits ---------------------------------------------------------------

def stdlib_files() -> tuple[str, list[str]]:
  """(root, sorted .py files of the standard library, site-/dist-packages excluded)."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for path in glob_lib.glob(os.path.join(root, '**', '*.py'), recursive=True):
    parts = os.path.relpath(path, root).split(os.sep)
    if 'site-packages' in parts or 'dist-packages' in parts or not os.path.isfile(path):
      continue
    files.append(path)
  return root, sorted(files)


def site_files(text_glob: str) -> tuple[str, list[str]]:
  """(root, sorted .py files) of the installed packages named by 'site:pkg1,pkg2' (found
  with importlib, never imported); root is their common parent, e.g. site-packages."""
  names = [n.strip() for n in text_glob[len(SITE):].split(',') if n.strip()]
  if not names:
    raise DataError(f'data.text_glob {text_glob!r} names no package (e.g. site:jax,flax)')
  dirs = []
  for name in names:
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      spec = None
    if spec is None or not (spec.submodule_search_locations or spec.origin):
      raise DataError(f'data.text_glob {text_glob!r}: no installed package {name!r}')
    if spec.submodule_search_locations:
      dirs.extend(os.path.abspath(p) for p in spec.submodule_search_locations)
    else:  # a single-module package: its directory would hold others, so list the file
      dirs.append(os.path.abspath(spec.origin))
  files = set()
  for d in dirs:
    if os.path.isfile(d):
      files.add(d)
    else:
      files.update(os.path.abspath(p)
                   for p in glob_lib.glob(os.path.join(d, '**', '*.py'), recursive=True)
                   if os.path.isfile(p))
  if not files:
    raise DataError(f'data.text_glob {text_glob!r} matches no .py files')
  root = os.path.commonpath([os.path.dirname(d) for d in dirs])
  return root, sorted(files)


def glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard ('/a/b/**/*.txt' -> '/a/b').

  Split hashes use paths relative to it, so adding files never moves old ones.
  """
  parts = os.path.abspath(os.path.expanduser(pattern)).split(os.sep)
  fixed = []
  for part in parts[:-1]:  # the last part names files, never the root
    if glob_lib.has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or os.sep


def resolve_glob(text_glob: str) -> tuple[str, list[str]]:
  """(root, sorted matching files) for data.text_glob: 'stdlib', 'site:pkg1,pkg2', a
  glob, or several globs separated by commas. '**' matches directories recursively."""
  if text_glob == STDLIB:
    return stdlib_files()
  if text_glob.startswith(SITE):
    return site_files(text_glob)
  patterns = [p.strip() for p in text_glob.split(',') if p.strip()]
  if not patterns:
    raise DataError('data.text_glob is empty')
  files = set()
  for pattern in patterns:
    files.update(os.path.abspath(p)
                 for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not files:
    raise DataError(f'data.text_glob {text_glob!r} matches no files')
  roots = [glob_root(p) for p in patterns]
  root = roots[0] if len(roots) == 1 else os.path.commonpath(roots)
  return root, sorted(files)


def dataset_name(text_glob: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
  """'stdlib', 'site_<packages>' or 'glob_<8 hex of sha256(text_glob)>'; a non-default
  val_fraction adds '_val<fraction>' (0.05 -> '_val0p05') so that each split layout has
  its own dataset."""
  packages = text_glob[len(SITE):].replace(' ', '').replace(',', '_')
  if text_glob == STDLIB:
    name = STDLIB
  elif text_glob.startswith(SITE) and packages.replace('_', '').isalnum():
    name = 'site_' + packages
  else:
    name = 'glob_' + hashlib.sha256(text_glob.encode('utf-8')).hexdigest()[:8]
  if val_fraction != DEFAULT_VAL_FRACTION:
    name += '_val' + f'{val_fraction:g}'.replace('.', 'p').replace('-', 'm')
  return name


def _path_hash(rel_path: str) -> float:
  """A stable number in [0, 1) for a relative path (same on every machine and run)."""
  digest = hashlib.sha256(rel_path.replace(os.sep, '/').encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def split_files(root: str, files: list[str], val_fraction: float) -> dict[str, list[str]]:
  """{'train': [...], 'validation': [...]}: a file is held out when the hash of its path
  relative to `root` is below val_fraction. With >= 2 files and val_fraction > 0 each split
  gets at least one file (the lowest hash goes to validation, the highest to train)."""
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f'data.val_fraction must be in [0, 1), got {val_fraction}')
  ranked = sorted(files, key=lambda p: _path_hash(os.path.relpath(p, root)))
  n_val = sum(_path_hash(os.path.relpath(p, root)) < val_fraction for p in files)
  if len(files) >= 2 and val_fraction > 0:
    n_val = min(max(n_val, 1), len(files) - 1)
  val = set(ranked[:n_val])
  return {'train': [p for p in files if p not in val],
          'validation': [p for p in files if p in val]}


def _read_text(path: str) -> str | None:
  """The file as UTF-8 text, or None when it does not decode."""
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError:
    return None


def _fingerprint(root: str, files: list[str]) -> str:
  """Hash of the relative paths and sizes: tells when a prepared dataset is stale."""
  h = hashlib.sha256()
  for p in files:
    h.update(f'{os.path.relpath(p, root)}\0{os.path.getsize(p)}\n'.encode('utf-8'))
  return h.hexdigest()[:16]


# ---- The TFDS builder ---------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """A config per corpus, made at run time: the files of `text_glob`, split by path hash."""
  text_glob: str = STDLIB
  val_fraction: float = DEFAULT_VAL_FRACTION

  @classmethod
  def for_data(cls, cfg_data) -> LocalTextConfig:
    return cls(name=dataset_name(cfg_data.text_glob, cfg_data.val_fraction),
               version='1.0.0', text_glob=cfg_data.text_glob,
               val_fraction=cfg_data.val_fraction,
               description=f'text files matching {cfg_data.text_glob!r}, '
                           f'val_fraction={cfg_data.val_fraction}')


class LocalText(tfds.core.GeneratorBasedBuilder):
  """One example per UTF-8 text file ({'text', 'path'}, key = path relative to the glob
  root); train/validation split by a stable hash of that path. Files that do not decode
  as UTF-8, and empty ones, are skipped and counted (`info.metadata`)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return self.dataset_info_from_configs(
        description='Local text files, one document per file.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'path': tfds.features.Text()}),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    root, files = resolve_glob(config.text_glob)
    usable, not_utf8, empty, size = [], 0, 0, 0
    for path in files:
      text = _read_text(path)
      if text is None:
        not_utf8 += 1
      elif not text.strip():
        empty += 1
      else:
        usable.append(path)
        size += len(text.encode('utf-8'))
    if not usable:
      raise DataError(f'data.text_glob {config.text_glob!r}: none of its {len(files)} files '
                      f'is non-empty UTF-8 text ({not_utf8} not UTF-8, {empty} empty)')
    splits = split_files(root, usable, config.val_fraction)
    self.info.metadata.update(
        root=root, fingerprint=_fingerprint(root, files), files_matched=len(files),
        skipped_not_utf8=not_utf8, skipped_empty=empty, text_bytes=size,
        files_per_split={k: len(v) for k, v in splits.items()})
    # TFDS cannot write a split without examples: an empty one is left out.
    return {name: self._generate_examples(root, paths)
            for name, paths in splits.items() if paths}

  def _generate_examples(self, root, paths):
    for path in paths:
      rel = os.path.relpath(path, root).replace(os.sep, '/')
      yield rel, {'text': _read_text(path), 'path': rel}


_BUILDERS: dict[tuple[str, str], LocalText] = {}


def local_text_builder(cfg_data) -> LocalText:
  """The prepared builder for cfg.data.text_glob, built on first use.

  TFDS writes into a randomly named incomplete directory and renames it when done, so a
  crash leaves no half dataset; if several processes build at once, the first rename
  wins and the others reuse its result.
  """
  config = LocalTextConfig.for_data(cfg_data)
  data_dir = default_data_dir(cfg_data)
  key = (data_dir, config.name)
  if key in _BUILDERS:
    return _BUILDERS[key]
  with _quiet_tfds():
    builder = LocalText(config=config, data_dir=data_dir, file_format='array_record')
    if builder.is_prepared():
      _warn_if_stale(builder, cfg_data)
    else:
      resolve_glob(cfg_data.text_glob)  # a clear error before TFDS starts
      t0 = time.perf_counter()
      try:
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints two lines per build
          builder.download_and_prepare(
              download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      except DataError:
        raise
      except Exception:  # pylint: disable=broad-except
        builder = LocalText(config=config, data_dir=data_dir, file_format='array_record')
        if not builder.is_prepared():
          raise
        # Another process finished the same dataset first: use it.
      else:
        m = builder.info.metadata
        counts = ' / '.join(f'{builder.info.splits[s].num_examples} {s}'
                            for s in SPLITS if s in builder.info.splits)
        print(f'lmjax: built dataset local_text/{config.name} from {cfg_data.text_glob!r}: '
              f'{counts} files, {_size(m["text_bytes"])} (skipped '
              f'{m["skipped_not_utf8"]} not UTF-8, {m["skipped_empty"]} empty) in '
              f'{time.perf_counter() - t0:.1f}s -> {builder.data_dir}', flush=True)
  _BUILDERS[key] = builder
  return builder


def _size(n_bytes: int) -> str:
  return f'{n_bytes / 1e6:.1f} MB' if n_bytes >= 1e5 else f'{n_bytes / 1e3:.1f} kB'


def _warn_if_stale(builder: LocalText, cfg_data) -> None:
  try:
    saved = builder.info.metadata['fingerprint']
    root, files = resolve_glob(cfg_data.text_glob)
  except (KeyError, TypeError, DataError):
    return
  if _fingerprint(root, files) != saved:
    print(f'lmjax: WARNING: the files of data.text_glob {cfg_data.text_glob!r} changed since '
          f'{builder.data_dir} was built; delete that directory to rebuild it', flush=True)


class _quiet_tfds:
  """TFDS logs every step at INFO/WARNING and shows progress bars: keep builds to one line."""

  def __enter__(self):
    # The 'absl' Python logger itself: absl's get/set_verbosity would restore the
    # --verbosity flag's level, undoing a level the caller had set on that logger.
    self._logger = logging.getLogger('absl')
    self._level = self._logger.level
    self._logger.setLevel(logging.ERROR)
    tfds.disable_progress_bar()

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)


# ---- Sources ------------------------------------------------------------------------

class TextSource:
  """Random-access str documents over a TFDS data source (len + __getitem__), as grain's
  MapDataset.source wants. Records' `key` field is decoded from UTF-8 bytes."""

  def __init__(self, source, key: str, name: str):
    self._source = source
    self._key = key
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    record = self._source[int(index)]
    try:
      text = record[self._key]
    except (KeyError, TypeError):
      fields = sorted(record) if hasattr(record, 'keys') else type(record).__name__
      raise DataError(f'{self.name}: records have no field data.text_key={self._key!r} '
                      f'(fields: {fields})') from None
    return text.decode('utf-8') if isinstance(text, bytes) else str(text)

  def __repr__(self) -> str:
    return f'TextSource({self.name}, {len(self)} documents)'


def get_source(cfg_data, split: str):
  """Random-access str documents of `split` (building the local dataset if needed)."""
  if cfg_data.source == 'local_text':
    builder = local_text_builder(cfg_data)
    name = f'local_text/{builder.builder_config.name}'
    key = 'text'
    if split not in builder.info.splits:
      hint = (' (validation is empty: data.val_fraction is 0 or the corpus has one file)'
              if split in SPLITS else '')
      raise DataError(f'{name} has no split {split!r}; it has {sorted(builder.info.splits)}'
                      f'{hint}: check data.train_split / data.eval_split')
  elif cfg_data.source == 'tfds':
    name, key = cfg_data.tfds_name, cfg_data.text_key
    if not name:
      raise DataError("data.tfds_name must be set when data.source='tfds'")
    data_dir = default_data_dir(cfg_data)
    with _quiet_tfds():
      try:
        if os.path.isfile(os.path.join(os.path.expanduser(name), 'dataset_info.json')):
          # A prepared dataset's directory (e.g. tools/prepare_data.py's output).
          builder = tfds.builder_from_directory(os.path.expanduser(name))
        else:
          builder = tfds.builder(name, data_dir=data_dir)
      except Exception as e:  # TFDS raises several types for unknown names/configs
        first_line = str(e).strip().split('\n')[0]  # (it goes on to list every dataset)
        raise DataError(f'data.tfds_name {name!r}: {first_line}') from e
      prepared = builder.is_prepared()
    if not prepared:
      raise DataError(f'data.tfds_name {name!r} is not prepared under data.data_dir '
                      f'{data_dir!r} (lmjax never downloads data: prepare it there in '
                      'array_record format first)')
    if split not in builder.info.splits:
      raise DataError(f'data.tfds_name {name!r} has no split {split!r}; it has '
                      f'{sorted(builder.info.splits)}')
  elif cfg_data.source in ('jsonl', 'parquet', 'hf_disk'):
    from lmjax.data import corpora  # pylint: disable=import-outside-toplevel
    return corpora.get_source(cfg_data, split)
  else:
    raise DataError(f"unknown data.source {cfg_data.source!r} (known: 'local_text', 'tfds', "
                    "'jsonl', 'parquet', 'hf_disk')")
  with _quiet_tfds():
    source = builder.as_data_source(split=split)
  if len(source) == 0:
    raise DataError(f'{name} split {split!r} is empty')
  return TextSource(source, key, f'{name}[{split}]')


def iter_texts(cfg_data, split: str, max_docs: int | None = None) -> Iterator[str]:
  """The documents of `split` as str, in order; with max_docs, that many spread evenly
  over the split (deterministic), e.g. to train a tokenizer on a large dataset."""
  source = get_source(cfg_data, split)
  n = len(source)
  if max_docs is None or max_docs >= n:
    indices = range(n)
  else:
    indices = np.unique(np.linspace(0, n - 1, max(max_docs, 1)).round().astype(np.int64))
  for i in indices:
    yield source[int(i)]
