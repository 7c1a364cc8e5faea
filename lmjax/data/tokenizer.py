"""sentencepiece tokenizers: loading, and training one on a dataset split.

Ids: pad 0, unk 1, bos 2, eos 3. Training keeps whitespace and newlines as they are
(code), with byte fallback so any text round-trips.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Iterable, Iterator

import sentencepiece as spm

from lmjax.data import sources


class Tokenizer:
  """A thin wrapper over `sentencepiece.SentencePieceProcessor`."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(f'tokenizer.path: no sentencepiece model at {path}')
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=path)

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
    return max(self.sp.pad_id(), 0)

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.sp.encode(texts)

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def __repr__(self) -> str:
    return f'Tokenizer({self.path}, vocab {self.vocab_size})'


def _chunks(texts: Iterable[str], max_sentences: int, lines_per_chunk: int = 8,
            max_chars: int = 2000) -> Iterator[str]:
  """Documents -> chunks of a few lines (newlines kept), at most max_sentences of them."""
  n = 0
  for text in texts:
    lines = text.split('\n')
    for i in range(0, len(lines), lines_per_chunk):
      chunk = '\n'.join(lines[i:i + lines_per_chunk])[:max_chars]
      if chunk.strip():
        yield chunk
        n += 1
        if n >= max_sentences:
          return


def train_sentencepiece(texts: Iterable[str], output_path: str, vocab_size: int,
                        model_type: str = 'bpe', max_sentences: int = 200_000) -> Tokenizer:
  """Trains a model on `texts` and writes it atomically to `output_path`."""
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output_path))) as tmp:
    prefix = os.path.join(tmp, 'sp')
    try:
      _train(texts, prefix, vocab_size, model_type, max_sentences)
    except RuntimeError as e:
      if 'Vocabulary size' in str(e):
        raise ValueError(f'tokenizer.vocab_size {vocab_size} is too small for this corpus: '
                         f'byte fallback needs 256 byte pieces plus every character seen '
                         f'({str(e).split("]")[-1].strip()})') from None
      raise
    os.replace(prefix + '.model', output_path)
  return Tokenizer(output_path)


def _train(texts, prefix, vocab_size, model_type, max_sentences):
  spm.SentencePieceTrainer.train(
      sentence_iterator=_chunks(texts, max_sentences),
      model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
      character_coverage=1.0, byte_fallback=True, split_digits=True,
      allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
      add_dummy_prefix=False, normalization_rule_name='identity',
      max_sentence_length=4096, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      num_threads=os.cpu_count() or 1, minloglevel=2)


def default_path(cfg) -> str:
  d, t = cfg.data, cfg.tokenizer
  name = sources.dataset_name(d.text_glob) if d.source == 'local_text' else d.tfds_name
  name = name.replace('/', '_').replace(':', '_')
  return os.path.join(sources.default_data_dir(d), 'tokenizers',
                      f'{name}_{t.model_type}_{t.vocab_size}.model')


def load_tokenizer(cfg) -> Tokenizer:
  """cfg.tokenizer.path, trained on the train split first if missing and allowed."""
  path = os.path.expanduser(cfg.tokenizer.path) if cfg.tokenizer.path else default_path(cfg)
  if not os.path.exists(path):
    if not cfg.tokenizer.train_if_missing:
      raise FileNotFoundError(
          f'tokenizer.path: no sentencepiece model at {path} (set tokenizer.train_if_missing '
          'or run tools/train_tokenizer.py)')
    t0 = time.perf_counter()
    tok = train_sentencepiece(sources.iter_texts(cfg.data, cfg.data.train_split), path,
                              cfg.tokenizer.vocab_size, cfg.tokenizer.model_type,
                              cfg.tokenizer.max_sentences)
    print(f'lmjax: trained a {tok.vocab_size}-piece {cfg.tokenizer.model_type} tokenizer '
          f'in {time.perf_counter() - t0:.1f}s -> {path}', flush=True)
  else:
    tok = Tokenizer(path)
  check_vocab(tok, cfg.model.vocab_size)
  return tok


def check_vocab(tok: Tokenizer, model_vocab: int) -> None:
  if tok.vocab_size > model_vocab:
    raise ValueError(f'tokenizer {tok.path} has {tok.vocab_size} pieces but '
                     f'model.vocab_size is {model_vocab}: the model cannot embed its ids')
