"""DPO of the LoRA-SFT tiny model on the built-in preference pairs.

Aligns the model of configs/sft_lora_tiny.py (init_from: its workdir, the config arg,
default /tmp/lmjax_sft; an SFT LoRA workdir loads as its base with the adapters merged)
with fresh rank-16 LoRA adapters; the reference is that model itself (the adapters off, in
the same step: no second copy of the weights). Pairs (data/sft_task.py `make_pairs`): the
SFT task's questions, chosen = the right answer, rejected = a plausible wrong one (the other
number, an off-by-one, the word unchanged). Sigmoid DPO loss, beta 0.1.

Run:
  python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=/tmp/lmjax_tiny
  python -m lmjax.train --config=configs/sft_lora_tiny.py --workdir=/tmp/lmjax_sft
  python -m lmjax.train --config=configs/dpo_tiny.py --workdir=/tmp/lmjax_dpo
  python tools/eval_sft.py --workdir=/tmp/lmjax_dpo --split=test

Logged as TRL names them: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,
rejected}; at each eval the same on held-out pairs (eval/rewards/accuracies) and the task's
exact match. Step 0: loss ln 2, rewards 0 (policy = reference). Measured figures:
docs/benchmarks.md.
"""

import os

from lmjax import config as config_lib

DEFAULT_SOURCE = '/tmp/lmjax_sft'


def get_config(arg=None):
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'pretrain_tiny.py'))
  smoke, base = config_lib.smoke_arg(arg)
  cfg.stage = 'dpo'
  cfg.init_from.update(path=base or DEFAULT_SOURCE)
  cfg.tokenizer.update(train_if_missing=False)  # init_from's tokenizer
  cfg.lora.update(enabled=True, targets='all-linear', rank=16, alpha=32.0)
  # rpo_alpha: plain DPO (0) lowered the chosen answers' likelihood with the rejected ones'
  # and broke generation on this tiny model (docs/benchmarks.md); RPO's chosen-NLL term
  # keeps the SFT behaviour.
  cfg.dpo.update(path='builtin:synthetic', loss_type='sigmoid', beta=0.1, rpo_alpha=1.0,
                 reference='auto')
  cfg.sft.update(path='builtin:synthetic', template='chatml', eval_examples=120,
                 eval_max_new_tokens=16)
  cfg.data.update(seq_len=64)  # one pair per row pair: questions are short
  cfg.train.update(global_batch=16, steps=150, log_every=10, eval_every=50, eval_batches=8)
  cfg.optim.update(lr=1e-3, warmup_steps=10, weight_decay=0.0)
  cfg.checkpoint.update(every=50)
  cfg.sample.update(prompt='What is 3 + 4?', max_new_tokens=8, temperature=0.0)
  if smoke:  # --config=configs/dpo_tiny.py:smoke[:SFT_WORKDIR]
    cfg.train.update(steps=10, eval_every=10, log_every=5, eval_batches=2)
    cfg.sft.update(eval_examples=12)
  return cfg
