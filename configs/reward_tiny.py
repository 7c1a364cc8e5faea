"""A reward model from the LoRA-SFT tiny model, on the built-in preference pairs.

Starts from the model of configs/sft_lora_tiny.py (init_from: its workdir, the config arg,
default /tmp/lmjax_sft; an SFT LoRA workdir loads as its base with the adapters merged):
its body, and a fresh score head (model.head='score': a [d_model, 1] linear read at each
sequence's last token, std model.init_std). Every weight trains (full fine-tuning: the
model is 1.3M parameters). Pairs (data/sft_task.py `make_pairs`): the SFT task's questions,
chosen = the right answer, rejected = a plausible wrong one. Bradley-Terry loss.

Run:
  python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=/tmp/lmjax_tiny
  python -m lmjax.train --config=configs/sft_lora_tiny.py --workdir=/tmp/lmjax_sft
  python -m lmjax.train --config=configs/reward_tiny.py --workdir=/tmp/lmjax_rm
  python tools/convert_hf.py export --workdir=/tmp/lmjax_rm --out_dir=/tmp/lmjax_rm_hf

Logged as TRL's RewardTrainer names them: accuracy, margin, mean_reward, min_reward,
max_reward; at each eval the same on held-out pairs (eval/accuracy, ...). Step 0: the
fresh head scores both answers almost alike (eval_loss ln 2, margin ~0). Expect (2-core
CPU, 2026-12-04): 300 steps in ~1.5 minutes, held-out accuracy 0.56 -> 0.66 over 128
pairs of questions never trained on (docs/benchmarks.md, the recipe's table).
"""

import os

from lmjax import config as config_lib

DEFAULT_SOURCE = '/tmp/lmjax_sft'


def get_config(arg=None):
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'pretrain_tiny.py'))
  smoke, base = config_lib.smoke_arg(arg)
  cfg.stage = 'reward'
  cfg.model.head = 'score'
  cfg.init_from.update(path=base or DEFAULT_SOURCE)
  cfg.tokenizer.update(train_if_missing=False)  # init_from's tokenizer
  cfg.reward.update(path='builtin:synthetic')
  cfg.sft.update(template='chatml')  # the SFT model's template: pairs render as it chats
  cfg.data.update(seq_len=64)  # one pair per row pair: questions are short
  cfg.train.update(global_batch=16, steps=300, log_every=10, eval_every=100, eval_batches=8,
                   sample_at_end=False)  # a reward model does not generate
  # lr 1e-3 overfit by step 300 (held-out accuracy 0.69 at 200, 0.64 at 300); LoRA rank 16
  # with the head trained (lr 1e-3) did as well as 3e-4 full, at twice the step time
  # (docs/benchmarks.md).
  cfg.optim.update(lr=3e-4, warmup_steps=20, weight_decay=0.0)
  cfg.checkpoint.update(every=100)
  if smoke:  # --config=configs/reward_tiny.py:smoke[:SFT_WORKDIR]
    cfg.train.update(steps=10, eval_every=10, log_every=5, eval_batches=2)
  return cfg
