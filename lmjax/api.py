"""What a notebook uses: load a trained or imported model, generate, score.

    import lmjax
    m = lmjax.load('/tmp/lmjax_tiny')            # an lmjax workdir (latest step) ...
    m = lmjax.load('/models/Llama-3.2-1B')       # ... or a Hugging Face model directory
    m.generate(['def fib(n):'], max_new_tokens=32)
    m.chat([{'role': 'user', 'content': 'Hi!'}])  # the model's chat template, an answer
    m.score(['import os\\n'])[0].logprobs       # per-token log-probs
    m.logits('import os')                        # [tokens, vocab]
    m.config.model.d_model

The parameters are restored onto the devices this process has (all of them, FSDP-sharded
by default, whatever mesh the run trained on): Orbax reshards on restore; a Hugging Face
directory is read tensor by tensor straight into the target shardings.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import evaluate, hf, sharding, weights
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.errors import NotFoundError
from lmjax.models import transformer
from lmjax.train import state as state_lib

# Notebook default: every device on the fsdp axis (params sharded, batch split over them).
DEFAULT_MESH = {'data': 1, 'fsdp': -1, 'tensor': 1}


@dataclasses.dataclass
class Scored:
  """One scored text: `tokens` (what was scored, BOS excluded), `logprobs[i]` = log p(tokens[i] |
  everything before it), `pieces` the tokens as text."""
  tokens: list[int]
  pieces: list[str]
  logprobs: np.ndarray

  @property
  def total(self) -> float:
    return float(self.logprobs.sum())


class Model:
  """A model ready for inference: `.config`, `.tokenizer`, `.params`, `.graphdef`,
  `.mesh`, and `.generate` / `.chat` / `.score` / `.logits` / `.perplexity`.

  max_len: the longest sequence the model computes faithfully (a Hugging Face model with
  a sliding attention window: the window, since lmjax attends to the whole context), or
  None; longer inputs are refused.
  trained_len: the longest sequence it was trained on (the run's data.seq_len; a Hugging
  Face model's max_position_embeddings), or None; longer inputs get a warning, once per
  call.
  """

  def __init__(self, config, params, graphdef, mesh, tokenizer, source: str, step=None,
               max_len: int | None = None, trained_len: int | None = None):
    self.config = config
    self.params = params
    self.graphdef = graphdef
    self.mesh = mesh
    self.tokenizer = tokenizer
    self.source = source
    self.step = step
    self.max_len = max_len
    self.trained_len = trained_len

  def __repr__(self) -> str:
    m = self.config.model
    n = sum(x.size for x in jax.tree.leaves(self.params))
    step = f', step {self.step}' if self.step is not None else ''
    return (f'Model({self.source}{step}: {n / 1e6:.1f}M params, {m.n_layers} layers, '
            f'd_model {m.d_model}, vocab {m.vocab_size}, mesh {dict(self.mesh.shape)})')

  def _tok(self):
    if self.tokenizer is None:
      raise ValueError(f'{self.source} has no tokenizer (no tokenizer.json or '
                       'tokenizer.model): pass token ids to generate_ids / score_ids / '
                       'logits, or load with tokenizer=PATH')
    return self.tokenizer

  def _check_len(self, n: int, what: str) -> None:
    if self.max_len is not None and n > self.max_len:
      raise ValueError(f'{what} of {n} tokens exceeds {self.max_len}, the longest this model '
                       f'computes faithfully (its sliding attention window; lmjax attends to '
                       'the whole context)')
    if self.trained_len is not None and n > self.trained_len:
      warnings.warn(f'{self.source}: {what} of {n} tokens is longer than the '
                    f'{self.trained_len} it was trained on (data.seq_len or '
                    'max_position_embeddings): expect its output to degrade past that',
                    stacklevel=3)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """The text's ids, after BOS when add_bos (default: the run's data.add_bos) and the
    tokenizer has one. Special-token text stays text."""
    tok = self._tok()
    add_bos = self.config.data.add_bos if add_bos is None else add_bos
    return (list(tok.bos) if add_bos else []) + tok.encode(text)

  def generate_ids(self, prompt_tokens: Sequence[Sequence[int]], **kwargs):
    """generate.generate on token ids; returns its GenerateOutput (tokens, lengths, ...)."""
    from lmjax import generate
    prompts = [list(p) for p in prompt_tokens]
    self._check_len(max(map(len, prompts), default=0) + kwargs.get('max_new_tokens', 0),
                    'a prompt plus max_new_tokens')
    with sharding.use_mesh(self.mesh, self.config.rules):
      return generate.generate(self.graphdef, self.params, prompts, **kwargs)

  def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               stop_tokens: Sequence[int] | None = None, seed: int = 0,
               add_bos: bool | None = None) -> str | list[str]:
    """Continuations of `prompts` (prompt excluded), cut before the first stop token
    (default: the tokenizer's stop_ids: EOS and a chat template's end of turn). Greedy
    unless temperature > 0. A str in, a str out."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    texts, _ = self._complete([self.encode(p, add_bos) for p in prompts], max_new_tokens,
                              temperature, top_k, top_p, stop_tokens, seed)
    return texts[0] if single else texts

  def _complete(self, ids, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed):
    """(the continuations' text, the number of tokens generated, stop tokens included)."""
    tok = self._tok()
    stops = tok.stop_ids if stop_tokens is None else tuple(stop_tokens)
    out = self.generate_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, stop_tokens=stops, seed=seed)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = [tok.decode(tokens[i, :lengths[i]].tolist()) for i in range(len(ids))]
    return texts, int(np.sum(lengths) + np.sum(np.asarray(out.stopped)))

  def chat(self, conversations, *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           template: str | None = None) -> str | list[str]:
    """The assistant's answer to each conversation ([{'role', 'content'}, ...], ending
    with a user turn), rendered with `template` (default the run's sft.template: 'auto' is
    the tokenizer's own chat template when it has one) and its generation prompt. One
    conversation in, a str out; a list of them, a list of str."""
    single = bool(conversations) and isinstance(conversations[0], dict)
    convs = [conversations] if single else list(conversations)
    answers, _ = self.chat_with_counts(convs, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=seed, template=template)
    return answers[0] if single else answers

  def chat_with_counts(self, conversations, *, max_new_tokens: int = 256,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int = 0, template: str | None = None) -> tuple[list[str], int]:
    """`chat` on a list of conversations, all in one batch: (the answers, the number of
    tokens generated, stop tokens included)."""
    from lmjax.data import formats
    convs = list(conversations)
    tok = self._tok()
    template = formats.resolve_template(template or self.config.sft.template, tok)
    ids = []
    for n, conv in enumerate(convs):
      turns = formats.normalize_example({'messages': list(conv) + [
          {'role': 'assistant', 'content': ''}]})
      if len(turns) > 1 and turns[-2]['role'] == 'assistant':
        raise ValueError(f'chat: conversation {n} ends with an assistant turn; end it with '
                         'the user turn to answer')
      ids.append(formats.prompt_ids(formats.render_prompt(turns, template, tok), tok,
                                    template))
    answers, n = self._complete(ids, max_new_tokens, temperature, top_k, top_p, None, seed)
    end = formats.end_marker(template)
    return [a.split(end, 1)[0] if end else a for a in answers], n

  def reward(self, inputs, *, add_bos: bool | None = None, template: str | None = None):
    """A reward model's (model.head='score') reward of each input: a text (encoded as
    `encode` does), a list of token ids, or a conversation ([{'role', 'content'}, ...],
    rendered whole with `template`, default the run's sft.template, as reward training
    renders it). One input in, a float out; a list of inputs, a list of floats."""
    if transformer.head_kind(self.config.model) != 'score':
      raise ValueError(f'{self.source} is a language model (model.head=lm), not a reward '
                       'model: reward() needs a model trained or imported with a score head')
    is_conv = lambda x: bool(x) and isinstance(x, (list, tuple)) and isinstance(x[0], dict)
    is_ids = lambda x: (isinstance(x, (list, tuple)) and len(x) > 0
                        and isinstance(x[0], (int, np.integer)))
    single = isinstance(inputs, str) or is_conv(inputs) or is_ids(inputs)
    items = [inputs] if single else list(inputs)
    seqs = []
    for x in items:
      if isinstance(x, str):
        seqs.append(self.encode(x, add_bos))
      elif is_conv(x):
        from lmjax.data import formats  # pylint: disable=import-outside-toplevel
        tok = self._tok()
        tmpl = formats.resolve_template(template or self.config.sft.template, tok)
        seqs.append(formats.encode(formats.normalize_example({'messages': list(x)}), tok,
                                   tmpl)[0].tolist())
      else:
        seqs.append([int(i) for i in x])
    self._check_len(max(map(len, seqs), default=0), 'an input')
    out = evaluate.sequence_rewards(self.graphdef, self.params, seqs, mesh=self.mesh,
                                    rules=self.config.rules)
    return float(out[0]) if single else [float(r) for r in out]

  def logits(self, inputs, add_bos: bool | None = None):
    """The model's logits (float32 numpy [tokens, vocab]) at every position of each input:
    a text (encoded as `encode` does) or a list of token ids. One input in (a str, or a
    list of ints), one array out; a list of inputs, a list of arrays."""
    single = isinstance(inputs, str) or (len(inputs) > 0 and isinstance(inputs[0], (int, np.integer)))
    items = [inputs] if single else list(inputs)
    seqs = [self.encode(x, add_bos) if isinstance(x, str) else [int(i) for i in x]
            for x in items]
    self._check_len(max(map(len, seqs), default=0), 'an input')
    out = evaluate.token_logits(self.graphdef, self.params, seqs, mesh=self.mesh,
                                rules=self.config.rules)
    return out[0] if single else out

  def score_ids(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """log p(seq[t] | seq[:t]) for t >= 1 of each token sequence."""
    self._check_len(max(map(len, sequences), default=0), 'a sequence')
    return evaluate.token_logprobs(self.graphdef, self.params, sequences, mesh=self.mesh,
                                   rules=self.config.rules)

  def score(self, texts: str | Sequence[str], add_bos: bool | None = None) -> list[Scored]:
    """Per-token log-probs of each text under the model (BOS is context, not scored)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tok = self._tok()
    add_bos = self.config.data.add_bos if add_bos is None else add_bos
    if not add_bos and any(len(tok.encode(t)) < 2 for t in texts):
      raise ValueError('score without BOS needs texts of at least two tokens')
    seqs = [self.encode(t, add_bos) for t in texts]
    out = []
    for seq, lp in zip(seqs, self.score_ids(seqs)):
      scored = seq[1:]
      out.append(Scored(tokens=scored, pieces=[tok.id_to_piece(i) for i in scored],
                        logprobs=lp))
    return out

  def exact_match(self, split: str = 'test', *, limit: int | None = None,
                  max_new_tokens: int = 16, batch_size: int = 64, sft: dict | None = None,
                  keep: int = 5, examples: list[dict] | None = None) -> dict:
    """Task accuracy on a split of the config's SFT data (cfg.sft; `sft={...}` overrides
    its fields, e.g. path=, template=): greedy answers to each conversation's final
    question, cut at the template's end-of-turn marker, compared exactly with the data's
    answers. examples: [{'prompt', 'answer'}] (rendered prompts, e.g.
    preference.answer_examples') to answer instead of the split's. evaluate.exact_match's
    result (accuracy, by_task, samples)."""
    from lmjax.data import formats
    cfg = self.config.copy_and_resolve_references()
    if sft:
      config_lib.apply_overrides(cfg, {f'sft.{k}': v for k, v in sft.items()})
    tok = self._tok()
    if examples is None:
      examples = formats.answer_examples(cfg, split, limit, tok)
    gen = lambda prompts: self._complete(
        [formats.prompt_ids(p, tok, cfg.sft.template) for p in prompts], max_new_tokens,
        0.0, 0, 1.0, None, 0)[0]
    return evaluate.exact_match(gen, examples, batch_size=batch_size, keep=keep,
                                normalize=formats.answer_normalizer(cfg.sft.template, tok))

  def perplexity(self, split: str | None = None, **kwargs) -> dict:
    """evaluate.perplexity of a split of the config's dataset (or `data={...}` overrides)."""
    return evaluate.perplexity(self.graphdef, self.params, self.config, self._tok(), split,
                               mesh=self.mesh, **kwargs)


def load(path: str, step: int | None = None, *, devices: Sequence[Any] | None = None,
         mesh: dict | None = None, tokenizer: str | None = None,
         seq_len: int | None = None, adapter: str | None = None) -> Model:
  """Loads an lmjax workdir (checkpoint `step`, default latest) or a Hugging Face model
  directory onto `devices` (default: all), sharded by `mesh` (default: all on fsdp).

  tokenizer: a tokenizer to use instead of the one the run used (or the directory's): a
  sentencepiece .model, a tokenizer.json, or a directory holding either.
  seq_len: the length the model is used at (cfg.data.seq_len, e.g. perplexity's rows).
  A Hugging Face model with a sliding attention window is used at most at its window
  (lmjax attends to the whole context): seq_len defaults to the shorter of the window
  and the base config's 256, and longer inputs are refused.
  adapter: a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
  trained on this base: merged into the params (with its own rank, alpha, rsLoRA and
  targets), so generate and score use it.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise NotFoundError(f'lmjax.load: {path} is not a directory (an lmjax workdir or a '
                        'Hugging Face model directory)')
  if seq_len is not None and seq_len < 2:
    raise ValueError(f'lmjax.load: seq_len must be >= 2, got {seq_len}')
  device_mesh_cfg = dict(DEFAULT_MESH if mesh is None else mesh)
  if weights.is_hf_dir(path):
    model = _load_hf(path, device_mesh_cfg, devices, tokenizer, seq_len)
  else:
    model = _load_workdir(path, step, device_mesh_cfg, devices, tokenizer, seq_len)
  return _merge_adapter(model, adapter) if adapter else model


def _merge_adapter(model: Model, adapter: str) -> Model:
  """`model` with the PEFT adapter in directory `adapter` merged into its params."""
  from lmjax.models import lora
  adapter = os.path.abspath(os.path.expanduser(adapter))
  adapters, settings = lora.load_peft_adapter(adapter, model.config)
  merge = jax.jit(lambda p, a: lora.merge(p, a, settings), donate_argnums=0,
                  out_shardings=jax.tree.map(lambda x: x.sharding, model.params))
  model.params = merge(model.params, adapters)
  model.source = f'{model.source} + adapter {adapter}'
  return model


def _with_mesh(cfg, mesh_cfg, seq_len=None):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():  # every axis: the training run's sizes do not carry over
    cfg.mesh.update({a: mesh_cfg.get(a, 1) for a in sharding.MESH_AXES})
    if seq_len:
      cfg.data.seq_len = int(seq_len)
  return cfg


def _load_workdir(path, step, mesh_cfg, devices, tokenizer_path, seq_len) -> Model:
  if not os.path.isdir(os.path.join(path, 'checkpoints')):
    raise ckpt_lib.CheckpointError(f'lmjax.load: {path} holds neither checkpoints/ (an lmjax '
                                   'workdir) nor config.json + *.safetensors (Hugging Face)')
  m = sharding.make_mesh(mesh_cfg, devices)
  params, saved, meta, step = weights.load_params(path, step, m)
  cfg = _with_mesh(saved, mesh_cfg, seq_len)
  graphdef, _, _ = state_lib.logical_param_specs(cfg)
  if tokenizer_path:
    tok = _tokenizer(cfg, tokenizer_path)
  elif meta.get('tokenizer') == '' and not cfg.tokenizer.path:
    tok = None  # recorded as none: an imported model that ships no tokenizer
  else:
    tok = _tokenizer(cfg, meta.get('tokenizer', ''))
  trained = max(saved.data.seq_len,
                (meta.get('hf_config') or {}).get('max_position_embeddings') or 0)
  return Model(cfg, params, graphdef, m, tok, source=path, step=step, trained_len=trained)


def _tokenizer(cfg, path):
  """`path` (given, or recorded in the checkpoint), else the run's config resolves it."""
  if path and os.path.exists(path):
    return tokenizer_lib.from_path(path)
  with cfg.unlocked():
    cfg.tokenizer.train_if_missing = False  # never silently train a different tokenizer
  try:
    return tokenizer_lib.load_tokenizer(cfg)
  except (FileNotFoundError, ValueError) as e:
    raise NotFoundError(f'lmjax.load: the tokenizer of this run is not on this machine '
                        f'({e}); pass tokenizer=PATH') from e


def _load_hf(path, mesh_cfg, devices, tokenizer_path, seq_len) -> Model:
  hf_config = hf.read_hf_config(path)
  window = hf.attention_window(hf_config)
  base = config_lib.base_config()
  base.data.seq_len = seq_len or min(base.data.seq_len, window or base.data.seq_len)
  cfg = _with_mesh(hf.config_from_hf(path, base), mesh_cfg)
  m = sharding.make_mesh(cfg.mesh, devices)
  graphdef, _, _ = state_lib.logical_param_specs(cfg)
  params = hf.load_params(path, cfg, m, dict(cfg.rules))
  if tokenizer_path:
    tok = tokenizer_lib.from_path(tokenizer_path)
  else:
    tok = tokenizer_lib.from_path(path) if tokenizer_lib.is_tokenizer_dir(path) else None
  return Model(cfg, params, graphdef, m, tok, source=path, max_len=window,
               trained_len=hf_config.get('max_position_embeddings'))
