"""Domain-adaptive continued pretraining of the tiny model on the JAX ecosystem's code.

Continues the model of configs/pretrain_tiny.py (init_from: its workdir, the config arg,
default /tmp/lmjax_tiny) on documents mixed 20% general (the standard library, as in
pretraining) and 80% domain (the installed sources of jax, flax and optax: present
wherever lmjax is), with the pretraining run's tokenizer and a fresh optimizer, and
evaluates both domains separately (eval/general/loss, eval/domain/loss).

Run:
  python -m lmjax.train --config=configs/pretrain_tiny.py --workdir=/tmp/lmjax_tiny
  python -m lmjax.train --config=configs/dapt_tiny.py --workdir=/tmp/lmjax_dapt
  (another source run: --config=configs/dapt_tiny.py:/path/to/its/workdir)

Expect (2-core CPU: 150 steps, about 3 minutes; the domain corpus, ~16 MB, is built in
seconds on first use): step 0 evaluates the pretrained model as is; the domain's
validation loss falls by ~0.6 while the general one rises at first (the fresh optimizer
warms up) and ends no worse than it started. Measured from the default pretrain_tiny run
(docs/benchmarks.md): domain 6.25 -> 5.58, general 6.13 -> 6.00, 2m55s wall. Mixing is
by documents: jax/flax/optax files are longer, so ~76% of the tokens (tokens/<name>) are
domain tokens.
"""

import os

from lmjax import config as config_lib

DEFAULT_SOURCE = '/tmp/lmjax_tiny'


def get_config(arg=None):
  # The pretraining config: the model must match the source run's.
  cfg = config_lib.build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      'pretrain_tiny.py'))
  cfg.init_from.update(path=arg or DEFAULT_SOURCE)
  cfg.data.mixture = dict(
      general=config_lib.data_source(text_glob='stdlib', weight=0.2),
      domain=config_lib.data_source(text_glob='site:jax,flax,optax', weight=0.8))
  cfg.tokenizer.update(train_if_missing=False)  # init_from's tokenizer, never a new one
  cfg.train.update(steps=150, log_every=10, eval_every=50, eval_batches=4)
  cfg.optim.update(lr=1e-3, warmup_steps=10)
  cfg.checkpoint.update(every=50)
  cfg.sample.update(prompt='import jax\n')
  return cfg
