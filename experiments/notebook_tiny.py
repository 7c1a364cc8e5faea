# %% [markdown]
# # lmjax in a notebook
#
# A notebook as a plain script (jupytext "percent" cells: open it in VS Code or Jupyter
# with jupytext, or run it top to bottom with `python experiments/notebook_tiny.py WORKDIR`;
# CI runs it). It restores a trained run on whatever devices this process has, generates,
# scores text, measures perplexity, and exports the model to Hugging Face format and back.
#
# With no trained run in WORKDIR it first trains `configs/pretrain_tiny.py:smoke`
# (20 steps, about a minute on a 2-core CPU); point it at a real run for real samples.

# %%
import os
import sys

import numpy as np

import lmjax
from lmjax import config as config_lib
from lmjax import evaluate, weights
from lmjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith('-') else '/tmp/lmjax_tiny'

if not os.path.isdir(os.path.join(WORKDIR, 'checkpoints')):
  cfg = config_lib.load(os.path.join(ROOT, 'configs/pretrain_tiny.py'), arg='smoke',
                        overrides={'train.progress_bar': False, 'train.sample_at_end': False})
  loop.train(cfg, WORKDIR)

# %% [markdown]
# ## Restore
# `lmjax.load` takes a workdir (latest step, or `step=`) or a Hugging Face directory. The
# params are resharded onto this process's devices (FSDP over all of them by default),
# whatever mesh the run trained on.

# %%
m = lmjax.load(WORKDIR)
print(m)
print('config:', m.config.model.d_model, 'd_model,', m.config.data.seq_len, 'tokens per row')

# %% [markdown]
# ## Generate
# Greedy by default; `temperature`, `top_k`, `top_p`, `stop_tokens` and `seed` as usual.

# %%
prompts = ['def ', 'import os\n', 'class ']
for p, out in zip(prompts, m.generate(prompts, max_new_tokens=24)):
  print(repr(p + out))
print(repr(m.generate('def ', max_new_tokens=24, temperature=0.8, top_p=0.9, seed=1)))

# %% [markdown]
# ## Score
# Per-token log-probs: which tokens surprise the model?

# %%
scored = m.score(['import os\nimport sys\n', 'sys os import\n\nimport'])
for s in scored:
  worst = int(np.argmin(s.logprobs))
  print(f'total {s.total:8.2f} nats | most surprising: {s.pieces[worst]!r} '
        f'({s.logprobs[worst]:.2f})')
assert scored[0].total / len(scored[0].tokens) > scored[1].total / len(scored[1].tokens) - 5
logits = m.logits('import os\n')  # [tokens, vocab], BOS first: what score reads from
print('logits', logits.shape, 'argmax after BOS:', repr(m.tokenizer.decode([logits[0].argmax()])))

# %% [markdown]
# ## Perplexity on the validation split, and task accuracy

# %%
ppl = m.perplexity(max_batches=4)
print(f"validation: loss {ppl['loss']:.3f}, perplexity {ppl['ppl']:.1f} over "
      f"{ppl['tokens']:.0f} tokens")
acc = evaluate.exact_match(lambda ps: m.generate(ps, max_new_tokens=4),
                           [{'prompt': 'import o', 'answer': 's'},
                            {'prompt': 'def __init__(self', 'answer': '):'}])
print(f"exact match {acc['correct']}/{acc['n']}")

# %% [markdown]
# ## Export to Hugging Face format and load it back
# `weights.export_workdir` writes config.json, generation_config.json, safetensors and the
# tokenizer's files; transformers' `AutoModelForCausalLM.from_pretrained` reads it, and so
# does `lmjax.load`.

# %%
hf_dir = os.path.join(WORKDIR, 'hf_export')
weights.export_workdir(WORKDIR, hf_dir, overwrite=True)
print(sorted(os.listdir(hf_dir)))
m2 = lmjax.load(hf_dir)
a, b = m.score(['def f(x):\n    return x\n'])[0], m2.score(['def f(x):\n    return x\n'])[0]
print(f'score in lmjax {a.total:.4f} vs after the round trip {b.total:.4f}')
assert np.allclose(a.logprobs, b.logprobs, atol=1e-5)
