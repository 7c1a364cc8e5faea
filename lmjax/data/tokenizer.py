"""sentencepiece tokenizers: loading one, and training one on a dataset split.

Ids: pad 0, unk 1, bos 2, eos 3. Training keeps whitespace and newlines as they are (the
default corpus is code), with byte fallback so that any text round-trips exactly.

    tok = load_tokenizer(cfg)    # trains <data_dir>/tokenizers/<dataset>_bpe_4096.model if missing
    tok.decode(tok.encode('def f():\\n    return 1\\n'))
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Iterable

import numpy as np
import sentencepiece as spm

from lmjax.data import sources

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
LINES_PER_SENTENCE = 8     # a training "sentence" is a chunk of up to this many lines,
MAX_SENTENCE_CHARS = 4096  # newlines kept, so pieces such as ':\n' can be learned.


class Tokenizer:
  """A thin wrapper over `sentencepiece.SentencePieceProcessor`; picklable (it carries
  the serialized model), so grain worker processes can use it."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(f'tokenizer.path: no sentencepiece model at {path}')
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=path)

  def __getstate__(self):
    return {'path': self.path, 'proto': self.sp.serialized_model_proto()}

  def __setstate__(self, state):
    self.path = state['path']
    self.sp = spm.SentencePieceProcessor(model_proto=state['proto'])

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    return max(self.sp.pad_id(), 0)  # -1 (no pad piece) in foreign models: use 0

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def __repr__(self) -> str:
    return f'Tokenizer({self.path!r}, vocab_size={self.vocab_size})'


def sample_sentences(texts: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
  """Chunks of up to LINES_PER_SENTENCE lines of `texts` (line ends kept), at most
  `max_sentences` of them: all of them in order when they fit, else a uniform sample
  (reservoir sampling with a fixed seed: the same texts give the same sample)."""
  rng = random.Random(seed)
  sample: list[str] = []
  seen = 0
  for text in texts:
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), LINES_PER_SENTENCE):
      chunk = ''.join(lines[i:i + LINES_PER_SENTENCE])[:MAX_SENTENCE_CHARS]
      if not chunk.strip():
        continue
      seen += 1
      if len(sample) < max_sentences:
        sample.append(chunk)
      else:
        j = rng.randrange(seen)
        if j < max_sentences:
          sample[j] = chunk
  return sample


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        model_type: str = 'bpe', max_sentences: int = 200_000) -> Tokenizer:
  """Trains a sentencepiece model on `texts`; writes <model_prefix>.model (and .vocab).

  A model_prefix that already ends in '.model' names the file itself. Files are written
  under temporary names and renamed, so a crash never leaves half a model.
  """
  path = model_prefix if model_prefix.endswith('.model') else model_prefix + '.model'
  out_dir = os.path.dirname(os.path.abspath(path))
  os.makedirs(out_dir, exist_ok=True)
  sentences = sample_sentences(texts, max_sentences)
  if not sentences:
    raise ValueError('train_sentencepiece: the texts hold no non-empty line to train on')
  with tempfile.TemporaryDirectory(dir=out_dir, prefix='.sp-train-') as tmp:
    prefix = os.path.join(tmp, 'sp')
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=vocab_size,
          model_type=model_type, character_coverage=1.0, byte_fallback=True,
          split_digits=True, allow_whitespace_only_pieces=True,
          remove_extra_whitespaces=False, add_dummy_prefix=False,
          normalization_rule_name='identity',
          max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes; chunks are capped in chars
          pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
          num_threads=min(os.cpu_count() or 1, 16), minloglevel=2)
    except RuntimeError as e:
      detail = str(e).rsplit(']', 1)[-1].split(' Increase vocab_size')[0].strip()
      raise ValueError(f'sentencepiece could not train a {vocab_size}-piece {model_type} '
                       f'model (tokenizer.vocab_size={vocab_size}): {detail} (byte fallback '
                       'needs 4 special + 256 byte pieces + one per distinct character)'
                       ) from None
    os.replace(prefix + '.vocab', path[:-len('.model')] + '.vocab')
    os.replace(prefix + '.model', path)  # last: its presence means "done"
  return Tokenizer(path)


def default_path(cfg) -> str:
  """<default_data_dir>/tokenizers/<dataset>_<model_type>_<vocab>.model."""
  d, t = cfg.data, cfg.tokenizer
  if d.source == 'local_text':
    name = sources.dataset_name(d.text_glob, d.val_fraction)
  else:
    name = d.tfds_name.replace('/', '_').replace(':', '_')
  return os.path.join(sources.default_data_dir(d), 'tokenizers',
                      f'{name}_{t.model_type}_{t.vocab_size}.model')


def resolve_path(cfg) -> str:
  return os.path.expanduser(cfg.tokenizer.path) if cfg.tokenizer.path else default_path(cfg)


def train_on_config(cfg, path: str | None = None, vocab_size: int | None = None) -> Tokenizer:
  """Trains cfg.tokenizer's kind of model on cfg.data's train split and writes it to
  `path` (default: where load_tokenizer looks). Prints what it built and how long it took."""
  t = cfg.tokenizer
  path = path or resolve_path(cfg)
  vocab_size = vocab_size or t.vocab_size
  t0 = time.perf_counter()
  # Large TFDS datasets: read documents spread over the split, not all of it.
  texts = sources.iter_texts(cfg.data, cfg.data.train_split, max_docs=max(t.max_sentences, 1))
  tok = train_sentencepiece(texts, path, vocab_size, t.model_type, t.max_sentences)
  print(f'lmjax: trained a {tok.vocab_size}-piece {t.model_type} tokenizer on '
        f'{cfg.data.train_split!r} in {time.perf_counter() - t0:.1f}s -> {tok.path}',
        flush=True)
  return tok


def load_tokenizer(cfg) -> Tokenizer:
  """cfg.tokenizer.path (or the default path), trained on the train split first when
  missing and cfg.tokenizer.train_if_missing; checked against cfg.model.vocab_size."""
  path = resolve_path(cfg)
  if os.path.exists(path):
    tok = Tokenizer(path)
  elif cfg.tokenizer.train_if_missing:
    tok = train_on_config(cfg, path)
  else:
    raise FileNotFoundError(
        f'tokenizer.path: no sentencepiece model at {path} (set tokenizer.train_if_missing=True '
        'or run tools/train_tokenizer.py)')
  check_vocab(tok, cfg.model.vocab_size)
  return tok


def check_vocab(tok: Tokenizer, model_vocab: int) -> None:
  if tok.vocab_size > model_vocab:
    raise ValueError(f'tokenizer vocab_size {tok.vocab_size} ({tok.path}) exceeds '
                     f'model.vocab_size {model_vocab}: the model cannot embed its ids')
