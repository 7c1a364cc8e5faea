"""Tokenizers: sentencepiece `.model` files and Hugging Face `tokenizer.json` files, behind
one interface; training a sentencepiece model on a dataset split.

    tok = from_path('/models/Llama-3.2-1B')     # a model dir, a tokenizer.json or a .model
    tok = load_tokenizer(cfg)    # cfg.tokenizer.path, or trains <data_dir>/tokenizers/...
    tok.decode(tok.encode('def f():\\n    return 1\\n'))

Both kinds read what a Hugging Face tokenizer directory says beside the vocabulary:
`tokenizer_config.json` (bos/eos/pad/unk tokens, `chat_template`; where it has no
`added_tokens_decoder`, `special_tokens_map.json` overrides its tokens, as transformers
does), `chat_template.jinja` (which takes priority over the config's template) and
`generation_config.json` (its `eos_token_id`s stop generation). `encode(text)` treats
special-token text such as '<|eot_id|>' in the input as plain text (documents are data);
`encode(text, specials=True)` turns it into the special ids, as transformers'
`tokenizer(text, add_special_tokens=False)` does (what chat templates need). Neither adds
BOS or EOS: the pipelines add `tok.bos` (empty when the tokenizer has no BOS, e.g. Qwen2)
and `tok.eos_id`.

lmjax's own sentencepiece models (tools/train_tokenizer.py) have ids pad 0, unk 1, bos 2,
eos 3; training keeps whitespace and newlines as they are (the default corpus is code),
with byte fallback so that any text round-trips exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import time
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from lmjax import config as config_lib
from lmjax.data import chat_template, corpora, sources
from lmjax.errors import NotFoundError, UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
LINES_PER_SENTENCE = 8     # a training "sentence" is a chunk of up to this many lines,
MAX_SENTENCE_CHARS = 4096  # newlines kept, so pieces such as ':\n' can be learned.


# Files of a Hugging Face tokenizer directory that lmjax reads, and copies along with a
# model (import into a workdir, export back to Hugging Face format).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json',
                   'special_tokens_map.json', 'chat_template.jinja', 'chat_template.json',
                   'added_tokens.json')
GENERATION_CONFIG = 'generation_config.json'  # read for its eos_token_id (stop tokens)
_SPECIAL_KEYS = ('bos_token', 'eos_token', 'unk_token', 'pad_token')


class Tokenizer:
  """What every lmjax tokenizer offers (sentencepiece and Hugging Face `tokenizers`).

  path: its .model or tokenizer.json file; location: what it was opened from (that file,
  or the directory holding it and its tokenizer_config.json: what checkpoints record).
  vocab_size: the largest id + 1 (added tokens included).
  bos_id / eos_id: None when the tokenizer defines none; pad_id: never None (0 if unset).
  special_tokens: {'bos_token': '<s>', ...} as text, for chat templates.
  chat_template: the Jinja chat template of the directory, or None.
  stop_ids: ids that end a generated answer: EOS, generation_config.json's eos_token_id,
  and the chat template's end-of-turn token (found by rendering a probe conversation).
  """

  kind = ''
  path: str
  bos_id: int | None
  eos_id: int | None
  pad_id: int
  special_tokens: dict
  chat_template: str | None
  config_dir: str | None  # the directory whose tokenizer_config.json etc. were read

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def bos(self) -> list[int]:
    """[bos_id], or [] for a tokenizer without BOS."""
    return [] if self.bos_id is None else [self.bos_id]

  def encode(self, text: str, specials: bool = False) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_with_offsets(self, text: str, specials: bool = True
                          ) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, [(start, end)] character offsets of each token in `text`)."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    raise NotImplementedError

  def id_to_piece(self, i: int) -> str:
    raise NotImplementedError

  def piece_to_id(self, piece: str) -> int | None:
    raise NotImplementedError

  def is_special(self, i: int) -> bool:
    """A control/special token (BOS, EOS, chat markers), not text."""
    raise NotImplementedError

  def files(self) -> list[str]:
    """The files that define this tokenizer (to copy it along with a model)."""
    raise NotImplementedError

  def sha256(self) -> str:
    """A digest of every file that defines the tokenizer (cache keys)."""
    h = hashlib.sha256()
    for path in sorted(self.files(), key=os.path.basename):
      h.update(os.path.basename(path).encode() + b'\0')
      with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
          h.update(block)
    return h.hexdigest()

  @property
  def stop_ids(self) -> tuple[int, ...]:
    if getattr(self, '_stop_ids', None) is None:
      ids = [] if self.eos_id is None else [self.eos_id]
      ids += self._generation_eos
      if self.chat_template:
        end = chat_template.end_of_turn_id(self)
        if end is not None:
          ids.append(end)
      self._stop_ids = tuple(dict.fromkeys(ids))
    return self._stop_ids

  def _read_config_dir(self, directory: str | None) -> None:
    """special_tokens, chat_template and generation eos ids from a tokenizer directory."""
    self.config_dir = directory
    self.special_tokens, self.chat_template, self._generation_eos = {}, None, []
    self._stop_ids = None
    if not directory:
      return
    config = _read_json(os.path.join(directory, 'tokenizer_config.json')) or {}
    tokens = {k: _token_text(config.get(k)) for k in _SPECIAL_KEYS}
    special_map = _read_json(os.path.join(directory, 'special_tokens_map.json'))
    if special_map and 'added_tokens_decoder' not in config:
      tokens.update((k, _token_text(special_map[k])) for k in _SPECIAL_KEYS if k in special_map)
    self.special_tokens = {k: v for k, v in tokens.items() if v is not None}
    template = config.get('chat_template')
    if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
      named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
      template = named.get('default')
    legacy = _read_json(os.path.join(directory, 'chat_template.json'))
    if legacy and isinstance(legacy.get('chat_template'), str):
      template = legacy['chat_template']
    jinja = os.path.join(directory, 'chat_template.jinja')
    if os.path.exists(jinja):
      with open(jinja, encoding='utf-8') as f:
        template = f.read()
    self.chat_template = template if isinstance(template, str) and template else None
    gen = _read_json(os.path.join(directory, GENERATION_CONFIG)) or {}
    eos = gen.get('eos_token_id')
    self._generation_eos = [int(e) for e in (eos if isinstance(eos, list) else [eos])
                            if isinstance(e, int)]

  def _special_id(self, key: str) -> int | None:
    text = self.special_tokens.get(key)
    return None if text is None else self.piece_to_id(text)

  @property
  def location(self) -> str:
    return getattr(self, '_location', None) or self.path

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.location!r}, vocab_size={self.vocab_size})'


class TokenizerError(UserError, ValueError):
  """A tokenizer file lmjax cannot read, train or use with the model; the message names
  the file or the setting."""


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      obj = json.load(f)
  except (OSError, ValueError) as e:
    raise TokenizerError(f'tokenizer: cannot read {path}: {e}') from None
  return obj if isinstance(obj, dict) else None


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json stores it: a string or {'content': ...}."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) and value else None


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; picklable (it carries the serialized model), so grain worker
  processes can use it. Special tokens: the model's control pieces, or those that a
  tokenizer_config.json beside it names."""

  kind = 'sentencepiece'

  def __init__(self, path: str, config_dir: str | None = None):
    if not os.path.exists(path):
      raise NotFoundError(f'tokenizer.path: no sentencepiece model at {path}')
    self.path = path
    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:  # sentencepiece's words for a file it cannot parse
      raise TokenizerError(f'tokenizer.path: {path} is not a readable sentencepiece model '
                           f'({str(e).strip()})') from None
    self._setup(config_dir)

  def _setup(self, config_dir):
    self._read_config_dir(config_dir)
    sp = self.sp
    n = sp.vocab_size()
    self._control = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    for key, i in (('bos_token', sp.bos_id()), ('eos_token', sp.eos_id()),
                   ('unk_token', sp.unk_id()), ('pad_token', sp.pad_id())):
      if key not in self.special_tokens and i >= 0:
        self.special_tokens[key] = sp.id_to_piece(i)
    self.bos_id = self._special_id('bos_token')
    self.eos_id = self._special_id('eos_token')
    pad = self._special_id('pad_token')
    self.pad_id = 0 if pad is None else pad  # foreign models often have none: use 0
    texts = {sp.id_to_piece(i) for i in self._control} | set(self.special_tokens.values())
    texts = sorted((t for t in texts if t), key=len, reverse=True)
    self._special_re = re.compile('|'.join(map(re.escape, texts))) if texts else None

  def __getstate__(self):
    return {'path': self.path, 'proto': self.sp.serialized_model_proto(),
            'config_dir': self.config_dir, 'location': self.location}

  def __setstate__(self, state):
    self.path = state['path']
    self.sp = spm.SentencePieceProcessor(model_proto=state['proto'])
    self._location = state.get('location')
    self._setup(state['config_dir'])

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  def _split(self, text: str, specials: bool):
    """[(start, piece text, special id or None)] of `text`."""
    if not specials or self._special_re is None:
      return [(0, text, None)]
    out, pos = [], 0
    for m in self._special_re.finditer(text):
      i = self.piece_to_id(m.group())
      if i is None:
        continue
      if m.start() > pos:
        out.append((pos, text[pos:m.start()], None))
      out.append((m.start(), m.group(), i))
      pos = m.end()
    if pos < len(text) or not out:
      out.append((pos, text[pos:], None))
    return out

  def encode(self, text: str, specials: bool = False) -> list[int]:
    if not specials:
      return self.sp.encode(text)
    ids = []
    for _, piece, special in self._split(text, True):
      ids += [special] if special is not None else self.sp.encode(piece)
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts))

  def encode_with_offsets(self, text, specials=True):
    ids, offsets = [], []
    for start, piece, special in self._split(text, specials):
      if special is not None:
        ids.append(special)
        offsets.append((start, start + len(piece)))
        continue
      proto = self.sp.encode(piece, return_type='proto')
      # byte offsets -> character offsets; byte-fallback pieces of one character are
      # zero-width but the last: give them the character's span.
      char_at = np.zeros(len(piece.encode('utf-8')) + 1, np.int64)
      b = 0
      for c, ch in enumerate(piece):
        n = len(ch.encode('utf-8'))
        char_at[b:b + n] = c
        b += n
      char_at[b] = len(piece)
      spans = [(p.begin, p.end) for p in proto.pieces]
      for k in range(len(spans) - 2, -1, -1):
        if spans[k][0] == spans[k][1]:
          spans[k] = spans[k + 1]
      for p, (b0, b1) in zip(proto.pieces, spans):
        ids.append(p.id)
        offsets.append((start + int(char_at[b0]), start + int(char_at[b1]) if b1 > b0
                        else start + int(char_at[b0])))
    return ids, offsets

  def decode(self, ids, skip_special=True) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if skip_special:
      return self.sp.decode([i for i in ids if i not in self._control])
    out, run = [], []
    for i in ids:
      if i in self._control:
        out.append(self.sp.decode(run) + self.sp.id_to_piece(i))
        run = []
      else:
        run.append(i)
    return ''.join(out) + self.sp.decode(run)

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

  def is_special(self, i: int) -> bool:
    return int(i) in self._control

  def files(self) -> list[str]:
    extra = []
    if self.config_dir:
      extra = [os.path.join(self.config_dir, f) for f in TOKENIZER_FILES[2:]
               if os.path.exists(os.path.join(self.config_dir, f))]
    return [self.path] + extra


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer (tokenizer.json), with the special tokens and
  chat template of the tokenizer_config.json beside it. Picklable."""

  kind = 'huggingface'

  def __init__(self, path: str, config_dir: str | None = None):
    if not os.path.exists(path):
      raise NotFoundError(f'tokenizer.path: no tokenizer.json at {path}')
    from tokenizers import Tokenizer as _Tok  # pylint: disable=import-outside-toplevel
    self.path = path
    try:
      self._tok = _Tok.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (its own exception type)
      raise TokenizerError(f'tokenizer.path: {path} is not a readable tokenizer.json '
                           f'({e})') from None
    self._setup(config_dir)

  def _setup(self, config_dir):
    from tokenizers import Tokenizer as _Tok  # pylint: disable=import-outside-toplevel
    # A second copy that reads special-token text as plain text (document encoding).
    self._plain = _Tok.from_str(self._tok.to_str())
    self._plain.encode_special_tokens = True
    self._read_config_dir(config_dir)
    added = self._tok.get_added_tokens_decoder()
    self._special = {i for i, t in added.items() if t.special}
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1 if vocab else 0
    self.bos_id = self._special_id('bos_token')
    self.eos_id = self._special_id('eos_token')
    pad = self._special_id('pad_token')
    self.pad_id = 0 if pad is None else pad

  def __getstate__(self):
    return {'path': self.path, 'json': self._tok.to_str(), 'config_dir': self.config_dir,
            'location': self.location}

  def __setstate__(self, state):
    from tokenizers import Tokenizer as _Tok  # pylint: disable=import-outside-toplevel
    self.path = state['path']
    self._tok = _Tok.from_str(state['json'])
    self._location = state.get('location')
    self._setup(state['config_dir'])

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str, specials: bool = False) -> list[int]:
    tok = self._tok if specials else self._plain
    return tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text, specials=True):
    tok = self._tok if specials else self._plain
    enc = tok.encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]

  def decode(self, ids, skip_special=True) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=skip_special)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def piece_to_id(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  def is_special(self, i: int) -> bool:
    return int(i) in self._special

  def files(self) -> list[str]:
    extra = []
    if self.config_dir:
      extra = [os.path.join(self.config_dir, f) for f in TOKENIZER_FILES[1:]
               if os.path.exists(os.path.join(self.config_dir, f))]
    return [self.path] + extra


def from_path(path: str) -> Tokenizer:
  """The tokenizer at `path`: a sentencepiece `.model`, a `tokenizer.json`, or a directory
  holding either (tokenizer.json first, as transformers' AutoTokenizer prefers it), with
  the tokenizer_config.json / chat template / generation_config.json beside it."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    for name, cls in (('tokenizer.json', HFTokenizer), ('tokenizer.model', SentencePieceTokenizer)):
      if os.path.exists(os.path.join(path, name)):
        tok = cls(os.path.join(path, name), config_dir=path)
        tok._location = path  # pylint: disable=protected-access
        return tok
    raise NotFoundError(f'tokenizer.path: {path} holds no tokenizer.json or '
                        'tokenizer.model')
  if not os.path.exists(path):
    raise NotFoundError(f'tokenizer.path: no tokenizer at {path}')
  directory = os.path.dirname(path)
  has_config = any(os.path.exists(os.path.join(directory, f))
                   for f in ('tokenizer_config.json', 'chat_template.jinja'))
  if path.endswith('.json'):
    return HFTokenizer(path, config_dir=directory)
  # A sentencepiece model: a Hugging Face directory's config files count only beside the
  # standard name (lmjax's own models sit in a shared tokenizers/ directory).
  is_hf_name = os.path.basename(path) == 'tokenizer.model'
  return SentencePieceTokenizer(path, config_dir=directory if has_config and is_hf_name else None)


def is_tokenizer_dir(path: str) -> bool:
  return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                     for f in ('tokenizer.json', 'tokenizer.model'))


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
    raise TokenizerError('train_sentencepiece: the texts hold no non-empty line to train on')
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
      raise TokenizerError(f'sentencepiece could not train a {vocab_size}-piece {model_type} '
                           f'model (tokenizer.vocab_size={vocab_size}): {detail} (byte '
                           'fallback needs 4 special + 256 byte pieces + one per distinct '
                           'character)') from None
    os.replace(prefix + '.vocab', path[:-len('.model')] + '.vocab')
    os.replace(prefix + '.model', path)  # last: its presence means "done"
  return SentencePieceTokenizer(path)


def default_path(cfg) -> str:
  """<default_data_dir>/tokenizers/<dataset>_<model_type>_<vocab>.model."""
  d, t = cfg.data, cfg.tokenizer
  if d.source == 'local_text':
    name = sources.dataset_name(d.text_glob, d.val_fraction)
  elif d.source in ('jsonl', 'parquet', 'hf_disk'):
    name = corpora.dataset_name(d)
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
  """cfg.tokenizer.path (a .model, a tokenizer.json or a tokenizer directory; default: the
  dataset's sentencepiece path), a sentencepiece model trained on the train split first
  when missing and cfg.tokenizer.train_if_missing; checked against cfg.model.vocab_size."""
  path = resolve_path(cfg)
  if os.path.exists(path):
    tok = from_path(path)
  elif cfg.tokenizer.train_if_missing and not path.endswith('.json'):
    tok = train_on_config(cfg, path)
  else:
    raise NotFoundError(
        f'tokenizer.path: no tokenizer at {path} (set tokenizer.train_if_missing=True '
        'or run tools/train_tokenizer.py to train a sentencepiece model there)')
  check_vocab(tok, cfg.model.vocab_size)
  return tok


def run_tokenizer(cfg, resumed_meta: dict | None = None, source=None) -> Tokenizer:
  """A training run's tokenizer: cfg.tokenizer.path when set; else, for a run from
  init_from, its source's (`source`: weights.InitSource; recorded in the checkpoint
  meta, so a resumed run keeps it); else load_tokenizer's default path (trained on the
  train split if missing)."""
  path, whose = cfg.tokenizer.path, ''
  if not path and resumed_meta and resumed_meta.get('init_from'):
    path, whose = resumed_meta.get('tokenizer', ''), 'this run\'s (checkpoint meta)'
  if not path and source is not None:
    if not source.tokenizer_path:
      raise config_lib.ConfigError(
          f'init_from {source} has no tokenizer (tokenizer.json or tokenizer.model): set '
          'tokenizer.path')
    path, whose = source.tokenizer_path, f'the tokenizer of init_from {source}'
  if not whose:
    return load_tokenizer(cfg)
  if not os.path.exists(path):
    raise NotFoundError(f'{whose} is missing: {path}; set tokenizer.path')
  inherited = cfg.copy_and_resolve_references()
  inherited.tokenizer.update(path=path, train_if_missing=False)
  return load_tokenizer(inherited)


def check_vocab(tok: Tokenizer, model_vocab: int) -> None:
  if tok.vocab_size > model_vocab:
    raise TokenizerError(f'tokenizer vocab_size {tok.vocab_size} ({tok.path}) exceeds '
                         f'model.vocab_size {model_vocab}: the model cannot embed its ids')
