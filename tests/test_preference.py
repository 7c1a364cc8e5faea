"""Preference data for DPO: pair formats, shared prompts, completion-only masks,
truncation/drop counts, the built-in pair task, and padding-invariant sequence log-probs."""

import json
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.data import preference, sft_task
from lmjax.data.sources import DataError
from lmjax.models import transformer
from lmjax.train import losses
from util import sft_tokenizer

SEQ = 64
VOCAB = 384


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return sft_tokenizer(tmp_path_factory.mktemp('tok'), VOCAB)


def make_cfg(path='builtin:synthetic', **dpo):
  cfg = config_lib.base_config()
  cfg.data.update(seq_len=SEQ, worker_threads=0, prefetch=0)
  cfg.dpo.update(path=str(path), **dpo)
  return cfg


def write_jsonl(path, objs):
  path.write_text(''.join((o if isinstance(o, str) else json.dumps(o)) + '\n' for o in objs),
                  encoding='utf-8')
  return path


def test_pair_formats():
  p, c, r = preference.normalize_pair({'prompt': 'Q?', 'chosen': 'yes', 'rejected': 'no'})
  assert p[0]['role'] == 'user' and c == [{'role': 'assistant', 'content': 'yes'}]
  msgs = {'prompt': [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'Q?'}],
          'chosen': [{'role': 'assistant', 'content': 'yes'}],
          'rejected': [{'role': 'assistant', 'content': 'no'}]}
  p2, c2, r2 = preference.normalize_pair(msgs)
  assert [t['role'] for t in p2] == ['system', 'user'] and r2[0]['content'] == 'no'
  implicit = {'chosen': msgs['prompt'] + msgs['chosen'],
              'rejected': msgs['prompt'] + msgs['rejected']}
  assert preference.normalize_pair(implicit) == (p2, c2, r2)
  for bad, msg in (({'prompt': 'Q'}, 'needs "chosen" and "rejected"'),
                   ({'prompt': 'Q', 'chosen': [], 'rejected': 'n'}, 'non-empty list'),
                   ({'prompt': 'Q', 'chosen': [{'role': 'user', 'content': 'x'}],
                     'rejected': 'n'}, 'end with an assistant'),
                   ({'chosen': 'a', 'rejected': 'b'}, 'needs a prompt')):
    with pytest.raises(ValueError, match=msg):
      preference.normalize_pair(bad)


def test_rows_share_the_prompt_and_mask_the_completion(tok):
  pair = preference.normalize_pair(sft_task.make_pairs(3)[2])
  start, ct, cm, rt, rm = preference.encode_pair(pair, tok, 'chatml')
  np.testing.assert_array_equal(ct[:start], rt[:start])
  assert not cm[:start].any() and cm[start:].all() and rm[start:].all()
  assert tok.decode(ct[start:].tolist()) == pair[1][0]['content'] + '<|im_end|>'
  assert ct[-1] == tok.eos_id and ct[0] == tok.bos_id
  (c, r), cut = preference.pair_rows((start, ct, cm, rt, rm), SEQ)
  assert not cut
  # targets[t] = tokens[t + 1]; the loss covers exactly the completion tokens (+ EOS).
  assert c['loss_mask'].sum() == len(ct) - start
  np.testing.assert_array_equal(c['targets'][:len(ct) - 1], ct[1:])
  assert c['segment_ids'][len(ct) - 1] == 1 and c['segment_ids'][len(ct)] == 0


def test_truncate_and_drop(tok):
  long_answer = 'word ' * 40
  pair = preference.normalize_pair({'prompt': 'Q?', 'chosen': long_answer, 'rejected': 'no'})
  enc = preference.encode_pair(pair, tok, 'chatml')
  (c, r), cut = preference.pair_rows(enc, SEQ, 'truncate')
  assert cut and c['segment_ids'].all() and c['loss_mask'].sum() == SEQ - enc[0]
  assert r['loss_mask'].sum() == len(enc[3]) - enc[0]  # the short one is whole
  assert preference.pair_rows(enc, SEQ, 'drop') is None
  long_prompt = preference.normalize_pair({'prompt': long_answer * 2, 'chosen': 'a',
                                           'rejected': 'b'})
  assert preference.pair_rows(preference.encode_pair(long_prompt, tok, 'chatml'), SEQ) is None


def test_iterator_batches_counts_and_resume(tok, tmp_path):
  good = sft_task.make_pairs(40, seed=3)
  lines = good[:10] + ['{oops', {'prompt': 'Q?' * 80, 'chosen': 'a', 'rejected': 'b'}] + good[10:]
  path = write_jsonl(tmp_path / 'train.jsonl', lines)
  cfg = make_cfg(path)
  it = preference.make_pair_iterator(cfg, tok, 'train', batch_size=4)
  b = next(it)
  assert b['inputs'].shape == (8, SEQ) and b['dropped'].shape == (8,)
  for i in range(4):  # rows 2i and 2i+1: one pair, the same prompt
    c, r = b['inputs'][2 * i], b['inputs'][2 * i + 1]
    start = int(np.argmax(b['loss_mask'][2 * i] > 0))
    np.testing.assert_array_equal(c[:start + 1], r[:start + 1])
  dropped = sum(int(next(it)['dropped'].sum()) for _ in range(20)) + int(b['dropped'].sum())
  assert dropped >= 2  # the overlong prompt, once per epoch (41 pairs, 84 drawn)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = preference.make_pair_iterator(cfg, tok, 'train', batch_size=4)
  it2.set_state(json.loads(json.dumps(state)))
  for a, b2 in zip(want, [next(it2) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b2[k])
  it.close()
  it2.close()
  with pytest.raises(DataError, match=re.escape(f'{path}:11: malformed preference pair')):
    preference.get_pairs(make_cfg(path, on_error='fail'), 'train')
  with pytest.raises(DataError, match='dpo.path .* matches no file'):
    preference.get_pairs(make_cfg(tmp_path / 'none-{split}.jsonl'), 'train')


def test_builtin_pair_task(tmp_path):
  pairs = sft_task.make_pairs(600, seed=0, split='test')
  assert pairs == sft_task.make_pairs(600, seed=0, split='test')
  tasks = {p['task'] for p in pairs}
  assert tasks == set(sft_task.TASKS)
  for p in pairs:
    q, a, w = (p['prompt'][0]['content'], p['chosen'][0]['content'],
               p['rejected'][0]['content'])
    assert a != w
    if p['task'] == 'add':
      x, y = (int(v) for v in q[len('What is '):-1].split(' + '))
      assert int(a) == x + y and abs(int(w) - int(a)) == 1
    if p['task'] == 'larger':
      assert int(a) > int(w)
  cfg = make_cfg()
  cfg.data.data_dir = str(tmp_path)
  cfg.dpo.task_sizes = dict(train=30, validation=6, test=6)
  assert len(preference.get_pairs(cfg, 'validation')) == 6


@pytest.mark.slow
def test_sequence_logprobs_do_not_depend_on_padding(tok):
  """The same pair padded to two lengths: the same log-probs and the same DPO loss."""
  mcfg = ml_collections.FrozenConfigDict(dict(
      config_lib.base_config().model.to_dict(), vocab_size=VOCAB, d_model=32, n_layers=2,
      n_heads=2, n_kv_heads=2, d_ff=64))
  model = transformer.build(mcfg, seed=0)
  pair = preference.normalize_pair(sft_task.make_pairs(6, seed=1)[4])
  enc = preference.encode_pair(pair, tok, 'chatml')
  out = []
  for seq in (SEQ, 2 * SEQ):
    (c, r), _ = preference.pair_rows(enc, seq)
    batch = {k: jnp.asarray(np.stack([c[k], r[k]])) for k in c}
    logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    lp, n = losses.sequence_logprobs(logits, batch['targets'], batch['loss_mask'])
    pc, pr = losses.split_pairs(lp)
    loss, _ = losses.dpo(pc, pr, pc - 1.0, pr + 1.0, beta=0.1)
    out.append((np.asarray(lp), np.asarray(n), float(loss[0])))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
  np.testing.assert_array_equal(out[0][1], out[1][1])
  assert out[0][2] == pytest.approx(out[1][2], rel=1e-5)
  # And they are the log-probs of the completion tokens computed directly.
  (c, _), _ = preference.pair_rows(enc, SEQ)
  logits = np.asarray(model(jnp.asarray(c['inputs'][None]))[0], np.float64)
  lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
      - logits.max(-1, keepdims=True)
  start, ct = enc[0], enc[1]
  want = sum(lsm[t - 1, ct[t]] for t in range(start, len(ct)))
  assert out[0][0][0] == pytest.approx(want, rel=1e-4)
