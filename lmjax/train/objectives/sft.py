"""Supervised fine-tuning (cfg.stage='sft'): the pretraining loss over chat batches.

Batch: conversations of cfg.sft rendered with cfg.sft.template and packed
(data/formats.py), the loss mask on assistant tokens only; loss and eval as pretraining's
(train/objectives/lm.py). Conversations longer than data.seq_len are truncated or dropped
(sft.overlong) and counted: 'sft/dropped' and 'sft/truncated' per logged step. At each eval,
greedy answers to the first sft.eval_examples conversations of the eval split are compared
with their final assistant turn ('eval/exact_match'). The end-of-run sample's prompt is a
user turn in the chat template.
"""

from __future__ import annotations

import numpy as np

from lmjax import config as config_lib
from lmjax import evaluate as evaluate_lib
from lmjax import generate
from lmjax.data import check as data_check
from lmjax.data import formats
from lmjax.train.objectives import lm


def validate_data_group(cfg, group: str) -> None:
  """The checks of a chat data group (cfg.sft, cfg.dpo): a path that names the data, the
  eval path, max_degenerate, no pretraining sources."""
  g = cfg[group]
  if cfg.data.mixture or cfg.data.eval_sources:
    raise config_lib.ConfigError(
        f"data.mixture / data.eval_sources are pretraining sources; with stage={group!r} "
        f'the data is cfg.{group}')
  if g.source == 'jsonl' and not g.path.strip():
    raise config_lib.ConfigError(formats.empty_path_message(group))
  if not 0 <= g.max_degenerate <= 1:
    raise config_lib.ConfigError(f'{group}.max_degenerate must be a fraction in [0, 1], got '
                                 f'{g.max_degenerate}')
  if g.eval_path and g.source != 'jsonl':
    raise config_lib.ConfigError(
        f"{group}.eval_path names JSONL files, but {group}.source is {g.source!r} (a TFDS "
        'dataset has its own splits): unset it')
  if g.source == 'tfds' and not g.tfds_name:
    raise config_lib.ConfigError(f"{group}.tfds_name must be set when {group}.source='tfds'")


def overlong_counts(host: dict) -> np.ndarray:
  """[dropped, truncated] totals of a chat batch's per-row overlong counts."""
  return np.asarray([int(np.sum(host[k])) for k in formats.COUNTS], np.int64)


def chat_exact_match(cfg, graphdef, params, tokenizer, mesh, examples) -> dict:
  """Greedy answers to `examples` ({'prompt', 'answer'}: rendered chat prompts) with
  `params`, cut at the template's end of turn: evaluate.exact_match's result."""
  def gen(prompts):
    ids = [formats.prompt_ids(p, tokenizer, cfg.sft.template) for p in prompts]
    out = generate.generate(graphdef, params, ids, max_new_tokens=cfg.sft.eval_max_new_tokens,
                            temperature=0.0, stop_tokens=tokenizer.stop_ids, mesh=mesh,
                            rules=dict(cfg.rules))
    return [tokenizer.decode(ids) for ids in out.ids()]
  return evaluate_lib.exact_match(gen, examples, batch_size=max(len(examples), 1),
                                  normalize=formats.answer_normalizer(cfg.sft.template,
                                                                      tokenizer))


def chat_sample_prompt(cfg, tokenizer, text: str):
  """`text` as a user turn in the chat template: (the rendered prompt, its ids)."""
  prompt = formats.render_prompt([{'role': 'user', 'content': text},
                                  {'role': 'assistant', 'content': ''}],
                                 cfg.sft.template, tokenizer)
  return prompt, formats.prompt_ids(prompt, tokenizer, cfg.sft.template)


class SFT(lm.LM):
  """The LM objective over packed conversations (cfg.sft)."""

  name = 'sft'

  def __init__(self, cfg):
    super().__init__(cfg)
    self.counters = tuple(f'sft/{k}' for k in formats.COUNTS)

  @classmethod
  def validate(cls, cfg):
    validate_data_group(cfg, 'sft')
    for key in ('eval_examples', 'eval_max_new_tokens', 'packing_bins'):
      if cfg.sft[key] < 0 or (key != 'eval_examples' and cfg.sft[key] == 0):
        raise config_lib.ConfigError(f'sft.{key} must be positive, got {cfg.sft[key]}')

  def check_data(self, tokenizer, log):
    return data_check.check_stage(self.cfg, tokenizer, 'sft', log=log)

  def iterator(self, tokenizer, split, *, source=None, keep=None, **kw):
    del source  # validate: no named sources
    return formats.make_sft_iterator(self.cfg, tokenizer, split, keep=keep, **kw)

  def split_batch(self, host):
    return {k: host[k] for k in self.batch_keys}, overlong_counts(host)

  def answer_examples(self, tokenizer, split):
    """The first sft.eval_examples conversations of `split` as questions."""
    limit = self.cfg.sft.eval_examples
    if limit <= 0 or not formats.has_split(self.cfg, split, 'sft'):
      return []
    return formats.answer_examples(self.cfg, split, limit, tokenizer)

  def exact_match(self, graphdef, params, tokenizer, mesh, examples):
    return chat_exact_match(self.cfg, graphdef, params, tokenizer, mesh, examples)

  def sample_prompt(self, tokenizer, text):
    return chat_sample_prompt(self.cfg, tokenizer, text)
