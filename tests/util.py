"""Shared helpers for tests: tiny configs, corpora and batches."""

import numpy as np

from lmjax import config as config_lib


def tiny_config(**model):
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   d_ff=128)
  cfg.model.update(**model)
  cfg.data.update(seq_len=32)
  cfg.tokenizer.update(vocab_size=256)
  cfg.train.update(global_batch=8, steps=10, log_every=1, eval_every=0,
                   progress_bar=False, sample_at_end=False)
  cfg.optim.update(lr=1e-2, warmup_steps=0)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.checkpoint.update(async_save=False)
  return cfg


def random_batch(cfg, seed=0, docs_per_row=1):
  """A packed batch of random tokens; with docs_per_row > 1 rows hold several documents."""
  rng = np.random.default_rng(seed)
  b, t = cfg.train.global_batch, cfg.data.seq_len
  tokens = rng.integers(4, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  if docs_per_row > 1:
    for r in range(b):
      cuts = np.sort(rng.choice(np.arange(1, t), docs_per_row - 1, replace=False))
      for i, c in enumerate(cuts):
        seg[r, c:] = i + 2
      starts = np.concatenate([[0], cuts])
      for s, e in zip(starts, np.concatenate([cuts, [t]])):
        pos[r, s:e] = np.arange(e - s)
  mask = np.ones((b, t), np.float32)
  mask[:, :-1] *= seg[:, 1:] == seg[:, :-1]
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
              positions=pos, loss_mask=mask)


def packed_segment_ids(rng, b, t, max_docs, pad=0.5, margin=1):
  """[b, t] int32 segment ids: 1..n documents a row (cut at least `margin` from the row's
  ends), with a padding tail (id 0) in a `pad` fraction of rows."""
  rows = []
  for _ in range(b):
    n = int(rng.integers(1, max_docs + 1))
    cuts = (np.sort(rng.choice(np.arange(margin, t - margin + 1), n - 1, replace=False))
            if n > 1 else [])
    row = np.zeros(t, np.int32)
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, t])):
      row[lo:hi] = i + 1
    if rng.random() < pad:
      row[t - int(rng.integers(1, t // 4)):] = 0
    rows.append(row)
  return np.stack(rows)


def packed_and_alone(model, lengths, vocab=256, seed=0):
  """Logits of documents of `lengths` packed into one row (segment ids, restarted
  positions), of each run alone, and of the packed row with one segment for all (what a
  kernel that attends across documents computes): three lists of [len, V] arrays."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  docs = [rng.integers(4, vocab, n).astype(np.int32) for n in lengths]
  packed = jnp.asarray(np.concatenate(docs)[None])
  seg = jnp.asarray(np.concatenate([np.full(n, i + 1, np.int32)
                                    for i, n in enumerate(lengths)])[None])
  pos = jnp.asarray(np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])[None])
  cut = np.cumsum(lengths)[:-1]
  split = lambda x: np.split(np.asarray(x[0], np.float32), cut)
  alone = [np.asarray(model(jnp.asarray(d[None]))[0], np.float32) for d in docs]
  return split(model(packed, pos, seg)), alone, split(model(packed, pos, jnp.ones_like(seg)))


def write_corpus(root, n_files=40, seed=0):
  """A small corpus of text files with real structure (code-like and prose lines)."""
  rng = np.random.default_rng(seed)
  words = ('the model data train loss step token batch shard mesh value return def '
           'class import self print for in range if else while with as').split()
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n_files):
    lines = []
    for j in range(int(rng.integers(20, 60))):
      if j % 3 == 0:
        lines.append(f'def f_{i}_{j}(x):\n    return x * {j} + {i}')
      else:
        lines.append(' '.join(rng.choice(words, int(rng.integers(4, 12)))) + '.')
    (root / f'doc_{i:03d}.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(root / '*.txt')


def sft_tokenizer(root, vocab_size=384):
  """A sentencepiece model trained on the built-in SFT task's text and the chat markers."""
  import json  # pylint: disable=import-outside-toplevel
  from lmjax.data import sft_task, tokenizer  # pylint: disable=import-outside-toplevel
  texts = [json.dumps(ex) for ex in sft_task.make_examples(600, seed=1)]
  texts += ['<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|><|im_start|>'
            'assistant\n<|im_end|>\n'] * 20
  return tokenizer.train_sentencepiece(texts, str(root / 'sp'), vocab_size)


def pretrain_cfg(root):
  """A 3-step tiny pretraining run on write_corpus(root / 'text'), on all 8 devices."""
  cfg = tiny_config()
  cfg.data.update(source='local_text', text_glob=str(root / 'text' / '*.txt'),
                  data_dir=str(root / 'tfds'), val_fraction=0.1)
  cfg.tokenizer.update(vocab_size=384, max_sentences=20_000)
  cfg.model.vocab_size = 384
  cfg.train.update(steps=3)
  cfg.mesh.update(data=-1)
  return cfg



def peft_adapter(base_model, out, **lora_kw):
  """A PEFT LoRA adapter (peft.LoraConfig(**lora_kw)) on a transformers model, with random
  nonzero B (a fresh one is the identity), saved to `out`; returns the PeftModel."""
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  pm = peft.get_peft_model(base_model, peft.LoraConfig(task_type='CAUSAL_LM', **lora_kw)).eval()
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if 'lora_B' in name:
        p.copy_(0.05 * torch.randn_like(p))
  pm.save_pretrained(str(out))
  return pm


def random_hf_model(config, path=None):
  """A transformers causal LM for `config` with every weight random (norm scales near 1),
  so that a swapped or misread tensor shows in its logits; saved to `path` if given.
  Returns it in eval mode."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if 'norm' in name else 0.1 * torch.randn_like(p))
  if path is not None:
    model.save_pretrained(str(path))
  return model


def model_loss_and_grads(model, cfg, seed=0, docs_per_row=3):
  """(mean train loss, gradients of every parameter) of `model` on a packed random batch
  of cfg's shape (docs_per_row documents a row): the kernel-vs-xla model comparisons."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from lmjax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  graphdef, params = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, seed, docs_per_row).items()}

  def loss(p):
    nll, _ = step_lib.loss_sums(graphdef, p, batch, 0.0)
    return nll / jnp.sum(batch['loss_mask'])
  return jax.jit(jax.value_and_grad(loss))(params)


def random_qkv(seed, b, t, n, k, h, dtype):
  """Random q [b, t, n, h], k, v [b, t, k, h] and an output cotangent g like q."""
  import jax  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.key(seed), 4)
  shapes = ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h))
  return tuple(jax.random.normal(key, s, dtype) for key, s in zip(keys, shapes))
