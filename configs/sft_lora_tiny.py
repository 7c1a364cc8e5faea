"""LoRA instruction tuning of the tiny pretrained model on the built-in synthetic task.

Fine-tunes the model of configs/pretrain_tiny.py (init_from: its workdir, the config arg,
default /tmp/lmjax_tiny) with rank-16 LoRA adapters on every projection, on the built-in
instruction set (data/sft_task.py: next_letter, larger, add, upper, reverse, length; a
20k/500/500 JSONL task written on first use), ChatML template, loss on the answers only.
At every eval the greedy answers to 120 validation questions are checked exactly
(eval/exact_match): the pretrained model answers none.

Run:
  python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=/tmp/lmjax_tiny
  python -m lmjax.train --config=configs/sft_lora_tiny.py --workdir=/tmp/lmjax_sft
  python tools/eval_sft.py --workdir=/tmp/lmjax_sft --split=test     # per-task accuracy
  (another base run: --config=configs/sft_lora_tiny.py:/path/to/its/workdir)

Expect (2-core CPU; docs/benchmarks.md has the measured run): see the module's numbers
there; checkpoints hold the adapters and their optimizer state only (the base is read
from init_from, recorded in the checkpoint).
"""

import os

from lmjax import config as config_lib

DEFAULT_SOURCE = '/tmp/lmjax_tiny'


def get_config(arg=None):
  # The pretraining config: the model must match the base run's.
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'pretrain_tiny.py'))
  smoke, base = config_lib.smoke_arg(arg)
  cfg.stage = 'sft'
  cfg.init_from.update(path=base or DEFAULT_SOURCE)
  cfg.tokenizer.update(train_if_missing=False)  # init_from's tokenizer
  # The tiny base saw 200 steps of code: the pieces of the chat markers ('<', '|', '>')
  # have small, undertrained embeddings, and with the (tied) embedding frozen their
  # logits stay capped; LoRA alone then cannot learn the template (docs/benchmarks.md:
  # one repeated batch, 40 steps: loss 4.99 LoRA only, 0.71 with the embedding trained,
  # 1.37 full fine-tuning). So the embedding trains with the adapters (PEFT's
  # modules_to_save), as is usual when a chat template is new to a model.
  cfg.lora.update(enabled=True, targets='all-linear', rank=16, alpha=32.0,
                  train_params='embed')
  cfg.sft.update(path='builtin:synthetic', template='chatml', eval_examples=120,
                 eval_max_new_tokens=16)
  cfg.train.update(global_batch=16, steps=200, log_every=10, eval_every=50, eval_batches=4)
  cfg.optim.update(lr=2e-3, warmup_steps=20, weight_decay=0.0)
  cfg.checkpoint.update(every=100)
  cfg.sample.update(prompt='What is 3 + 4?', max_new_tokens=8, temperature=0.0)
  if smoke:  # --config=configs/sft_lora_tiny.py:smoke[:BASE] for a 20-step smoke run
    cfg.train.update(steps=20, eval_every=10, log_every=5)
    cfg.sft.update(eval_examples=24)
  return cfg
