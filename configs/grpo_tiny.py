"""GRPO of the LoRA-SFT tiny model on the built-in task's questions, rewarded by exact match.

Starts from the model of configs/sft_lora_tiny.py (init_from: its workdir, the config arg,
default /tmp/lmjax_sft; an SFT LoRA workdir loads as its base with the adapters merged)
with fresh rank-16 LoRA adapters. Each step samples 8 completions of each of 16 training
questions (data/sft_task.py) on the training mesh, rewards each by exact match with the
question's answer (lmjax/rewards.py `exact_match`), and updates the adapters towards the
completions that beat their group's mean (DAPO's token-mean loss, no KL term).

Run:
  python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=/tmp/lmjax_tiny
  python -m lmjax.train --config=configs/sft_lora_tiny.py --workdir=/tmp/lmjax_sft
  python -m lmjax.train --config=configs/grpo_tiny.py --workdir=/tmp/lmjax_grpo
  python tools/eval_sft.py --workdir=/tmp/lmjax_grpo --split=test

Logged as TRL names them: reward, reward_std, rewards/exact_match/mean,
frac_reward_zero_std, entropy, clip_ratio/*, completions/*; at each eval the greedy
answers' reward and exact match on held-out questions. The loss is ~0 at every step (one
update per rollout: see train/objectives/grpo.py); the reward is what rises. Measured
(docs/benchmarks.md, 3 seeds, ~13 min each on 2 cores): sampled reward ~0.09 -> ~0.15, test
exact match 0.162 -> 0.222 +- 0.033, the gain in "Which is larger".
"""

import os

from lmjax import config as config_lib

DEFAULT_SOURCE = '/tmp/lmjax_sft'


def get_config(arg=None):
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'pretrain_tiny.py'))
  smoke, base = config_lib.smoke_arg(arg)
  cfg.stage = 'grpo'
  cfg.init_from.update(path=base or DEFAULT_SOURCE)
  cfg.tokenizer.update(train_if_missing=False)  # init_from's tokenizer
  cfg.lora.update(enabled=True, targets='all-linear', rank=16, alpha=32.0)
  cfg.grpo.update(path='builtin:synthetic', num_generations=8, max_completion_length=16,
                  temperature=1.0, reward_funcs='exact_match', loss_type='dapo', beta=0.0)
  cfg.sft.update(path='builtin:synthetic', template='chatml', eval_examples=120,
                 eval_max_new_tokens=16)
  cfg.data.update(seq_len=64)  # questions are short
  cfg.train.update(global_batch=16, steps=300, log_every=10, eval_every=50)
  cfg.optim.update(lr=2e-3, warmup_steps=5, weight_decay=0.0)
  cfg.checkpoint.update(every=50)
  cfg.sample.update(prompt='What is 3 + 4?', max_new_tokens=8, temperature=0.0)
  if smoke:  # --config=configs/grpo_tiny.py:smoke[:SFT_WORKDIR]
    cfg.train.update(steps=6, eval_every=3, log_every=3, global_batch=4)
    cfg.grpo.update(num_generations=4)
    cfg.sft.update(eval_examples=12)
  return cfg
