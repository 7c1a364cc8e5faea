"""What the objectives on two-row examples share: DPO's pairs, KTO's example and KL row, a
reward model's pairs.

Paired: a batch of B examples is 2B rows, example i in rows 2i and 2i + 1, read from one
chat data group (cfg.<group>: its data check and its overlong counters '<group>/dropped',
'<group>/truncated'); the normaliser is the examples of the global batch; eval sums the
objective's metrics over held-out batches and logs them as eval_loss, eval_<normaliser>
and eval/<metric>.

Aligned: a Paired objective that aligns a language model against a reference, the model
it starts from (init_from), chosen by cfg.<group>.reference:
    adapters_off  LoRA: the base model with the adapters off, in the same step (no copy);
    copy          a frozen copy of the starting params in the state ('ref_params'; not
                  checkpointed: rebuilt from the recorded init_from on resume);
    precomputed   the reference's log-probs of both rows computed once before training
                  and read with the data (train/ref_logps.py, 'ref_logps' per row).
    (auto: adapters_off with LoRA, else copy.)
Exact match at each eval and the end-of-run sample go through the chat template.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax import config as config_lib
from lmjax.data import check as data_check
from lmjax.data import formats
from lmjax.train import forward, losses
from lmjax.train.objectives import base
from lmjax.train.objectives import sft as sft_lib


def row_logps(graphdef, params, batch, router=False, **kw):
  """Completion log-prob sums and token counts of a two-row batch ([2B] rows -> [B] each):
  (even rows, odd rows, even rows' tokens, odd rows' tokens), one forward pass. With
  `router`, (that, the MoE router statistics or None)."""
  (lp, n), stats = forward.row_logps(graphdef, params, batch, router=True, **kw)
  out = (*losses.split_pairs(lp), *losses.split_pairs(n))
  return (out, stats) if router else out


class Paired(base.Objective):
  """Two rows per example from the chat data group `group` (see the module doc)."""

  rows_per_example = 2
  group = ''  # the config group of its data: 'dpo', 'kto', 'reward'

  def __init__(self, cfg):
    super().__init__(cfg)
    self.counters = tuple(f'{self.group}/{k}' for k in formats.COUNTS)

  def check_data(self, tokenizer, log):
    return data_check.check_stage(self.cfg, tokenizer, self.group, log=log)

  def split_batch(self, host):
    return {k: host[k] for k in self.batch_keys}, sft_lib.overlong_counts(host)

  def denominator(self, batch):
    return jnp.float32(batch['inputs'].shape[0] // 2)  # examples in the global batch

  def eval_step(self, setup):
    """(weights, batch) -> the loss and metric sums over the batch's examples and their
    count (under the normaliser's name), no dropout."""
    sums = self.sums(setup)

    def step(weights, batch):
      _, aux = sums(weights, batch, None)
      return dict(aux, **{self.normaliser: self.denominator(batch)})

    return forward.jit_eval(setup, step, forward.batch_shardings(setup.mesh, setup.rules,
                                                                 self.batch_spec(2)))

  def evaluate(self, eval_step, weights, tokenizer, mesh, process_index, process_count,
               keep=None):
    """The loss and the logged metrics (`metrics`) over cfg.train.eval_batches batches of
    held-out examples: eval_loss, eval_<normaliser> and eval/<metric> (counts of the
    batches' labels, 'count/...', are the data's, not the model's: not logged)."""
    total = self.eval_outputs(eval_step, weights, tokenizer, mesh, process_index,
                              process_count, keep=keep)
    n = total.pop(self.normaliser)
    m = {k: float(v) for k, v in self.metrics(total, n).items() if not k.startswith('count/')}
    out = {'eval_loss': m.pop('loss'), f'eval_{self.normaliser}': n}
    out.update((f'eval/{k}', v) for k, v in m.items())
    return out


class Aligned(Paired):
  """A Paired objective against a reference model (see the module doc)."""

  needs_base = True  # the reference is the starting model (init_from)

  def __init__(self, cfg):
    super().__init__(cfg)
    self.reference = self.reference_mode(cfg)
    if self.reference == 'precomputed':
      self.row_keys['ref_logps'] = jnp.float32
    self.tables = {}  # split -> precomputed reference log-probs

  @classmethod
  def reference_mode(cls, cfg) -> str | None:
    """cfg.<group>.reference resolved: 'adapters_off' with LoRA for 'auto', else 'copy'."""
    mode = cfg[cls.group].reference
    if mode == 'auto':
      return 'adapters_off' if cfg.lora.enabled else 'copy'
    return mode

  @classmethod
  def validate(cls, cfg):
    """The chat data group's checks, init_from (the model to align, and the reference),
    beta > 0, adapters_off only with LoRA."""
    g = cfg[cls.group]
    sft_lib.validate_data_group(cfg, cls.group)
    if not cfg.init_from.path:
      raise config_lib.ConfigError(f"stage='{cls.name}': set init_from.path (the SFT model to "
                                   'align; it is also the reference)')
    if g.beta <= 0:
      raise config_lib.ConfigError(f'{cls.group}.beta must be positive, got {g.beta}')
    if g.reference == 'adapters_off' and not cfg.lora.enabled:
      raise config_lib.ConfigError(f"{cls.group}.reference='adapters_off' needs lora.enabled "
                                   '(the reference is the base without adapters)')

  def state_entries(self, abstract_params, param_shardings):
    if self.reference != 'copy':
      return {}
    return base.reference_copy(abstract_params, param_shardings)

  def reference_logps(self, graphdef, weights, batch):
    """The reference's completion log-prob sums of the even and the odd rows ([B] each),
    no gradient."""
    if self.reference == 'precomputed':
      return losses.split_pairs(batch['ref_logps'])
    params = weights['params'] if self.reference == 'adapters_off' else weights['ref_params']
    even, odd, _, _ = jax.lax.stop_gradient(row_logps(graphdef, params, batch))
    return even, odd

  def exact_match(self, graphdef, params, tokenizer, mesh, examples):
    return sft_lib.chat_exact_match(self.cfg, graphdef, params, tokenizer, mesh, examples)

  def sample_prompt(self, tokenizer, text):
    return sft_lib.chat_sample_prompt(self.cfg, tokenizer, text)
