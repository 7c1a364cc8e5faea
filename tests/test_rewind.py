"""Loss spikes: the one place that judges each step (train/spikes.py) and the rewind
(train.on_spike=rewind): restore the last checkpoint before the spike, skip the batches
that followed it, continue."""

import json
import math

import grain
import jax
import numpy as np
import pytest

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax.data import pipeline
from lmjax.train import loop, metrics, spikes
from lmjax.train.objectives import lm
from util import pretrain_cfg, tiny_config, write_corpus


def _monitor(**spike):
  cfg = config_lib.base_config().train
  cfg.loss_spike.update(**spike)
  return cfg


def test_monitor_verdicts():
  cfg = _monitor(factor=2.0, window=5)
  cfg.on_spike = 'rewind'
  mon = spikes.SpikeMonitor(cfg)
  ok = lambda step, loss, **kw: mon.observe(step, dict(loss=loss, grad_norm=1.0, **kw))
  for i in range(4):  # too few steps in the window to judge a factor yet
    assert ok(i + 1, 3.0 if i else 30.0) == spikes.OK
  assert ok(5, 3.0) == spikes.OK
  v = ok(6, 40.0)   # mean of the previous 5: (30 + 4 x 3) / 5 = 8.4; 40 > 16.8
  assert v.action == 'rewind' and 'above train.loss_spike.factor 2 x the mean' in v.reason
  assert mon.steps[-1] == 5  # a spike never enters the running mean
  assert ok(6, 7.0) == spikes.OK
  v = mon.observe(7, dict(loss=float('nan'), grad_norm=1.0))
  assert v.action == 'rewind' and v.reason.startswith('non-finite loss nan')
  # skip_bad_steps' skipped steps are fine, until too many come in a row
  assert mon.observe(7, dict(loss=float('nan'), grad_norm=float('nan'), skipped=True,
                             skipped_in_a_row=3)) == spikes.OK
  v = mon.observe(8, dict(loss=1.0, grad_norm=1.0, skipped=True, skipped_in_a_row=11))
  assert v.action == 'stop' and '11 steps in a row skipped' in v.reason
  mon.rewound(5)
  assert mon.steps == [1, 2, 3, 4, 5]
  stop = spikes.SpikeMonitor(_monitor())  # the defaults: stop, on non-finite losses only
  assert stop.observe(1, dict(loss=1.0, grad_norm=1.0)) == spikes.OK
  assert stop.observe(2, dict(loss=1e9, grad_norm=1.0)) == spikes.OK
  assert stop.observe(3, dict(loss=math.inf, grad_norm=1.0)).action == 'stop'


def test_spike_score_is_the_fraction_of_seven_sigma_steps():
  mon = spikes.SpikeMonitor(_monitor())
  rng = np.random.default_rng(0)
  losses = 3.0 + 0.01 * rng.standard_normal(200)
  losses[[50, 120]] = 3.5  # 50 sigma: spikes
  for i, x in enumerate(losses):
    assert mon.observe(i + 1, dict(loss=float(x), grad_norm=1.0)) == spikes.OK
  assert mon.spike_score() == pytest.approx(2 / 200)
  mon.rewound(100)
  assert mon.spike_score() == pytest.approx(1 / 100)


def test_rewind_config_errors():
  cfg = tiny_config()
  cfg.train.on_spike = 'retry'
  with pytest.raises(config_lib.ConfigError, match="'train.on_spike' must be one of"):
    config_lib.validate(cfg)
  cfg.train.on_spike = 'rewind'
  cfg.train.loss_spike.factor = 0.5
  with pytest.raises(config_lib.ConfigError, match=r'loss_spike.factor must be 0 \(off\) or > 1'):
    config_lib.validate(cfg)


# ---- The rewind, end to end -----------------------------------------------------------

SEQ, ROWS, VOCAB = 32, 8, 384


def _batches(n, poison=()):
  """n batches of an easy language (each row counts up from a random start, mod 40), the
  batches at `poison` uniformly random tokens: their loss jumps far above the rest."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    if i in poison:
      tokens = rng.integers(4, VOCAB, (ROWS, SEQ + 1))
    else:
      tokens = 4 + (rng.integers(0, 40, (ROWS, 1)) + np.arange(SEQ + 1)) % 40
    tokens = tokens.astype(np.int32)
    mask = np.ones((ROWS, SEQ), np.float32)
    out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                    segment_ids=np.ones((ROWS, SEQ), np.int32),
                    positions=np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1)),
                    loss_mask=mask))
  return out


def _serve(monkeypatch, batches):
  """The pretraining objective reads `batches`, in order, exactly resumable (grain)."""
  def iterator(self, tokenizer, split, **kw):
    return iter(pipeline.finish(self.cfg.data,
                                grain.MapDataset.source(batches).to_iter_dataset()))
  monkeypatch.setattr(lm.LM, 'iterator', iterator)


@pytest.fixture(scope='module')
def text(tmp_path_factory):
  root = tmp_path_factory.mktemp('rewind')
  write_corpus(root / 'text')  # for the tokenizer
  return root


def _cfg(root, **train):
  cfg = pretrain_cfg(root)
  cfg.train.update(**{'steps': 24, 'log_every': 4, **train})
  cfg.checkpoint.update(every=4, keep=10)
  return cfg


@pytest.mark.slow
def test_rewind_ends_where_a_run_without_the_skipped_batches_ends(text, tmp_path,
                                                                   monkeypatch):
  """A poisoned batch (step 14) spikes the loss; the rewind restores step 12's checkpoint
  and skips batches 12..14 (skip_batches 3); stopped at step 20 and resumed (with the data
  position its checkpoint recorded), the run then ends with the parameters, the metrics
  and the checkpoints of a run whose data never held those batches."""
  poisoned = _batches(40, poison={13})
  _serve(monkeypatch, poisoned)
  cfg = _cfg(text, on_spike='rewind')
  cfg.train.loss_spike.update(factor=2.0, window=8, skip_batches=3)
  first = loop.train(cfg, str(tmp_path / 'a'), stop_after=20)
  assert first.stopped_early and [h['step'] for h in first.history] == [4, 8, 12, 16, 20]
  got = loop.train(cfg, str(tmp_path / 'a'))

  meta = ckpt_lib.Checkpointer(str(tmp_path / 'a'), cfg, read_only=True).read_meta()
  (rewind,) = meta['rewinds']
  assert rewind['step'] == 14 and rewind['restored_step'] == 12
  assert rewind['skipped_batches'] == [12, 15] and 'loss_spike.factor' in rewind['reason']
  assert meta['data_batches'] == 24 + 3

  _serve(monkeypatch, poisoned[:12] + poisoned[15:])  # the stream without those batches
  ref = loop.train(_cfg(text), str(tmp_path / 'b'))
  for a, b in zip(jax.tree.leaves(got.state['params']), jax.tree.leaves(ref.state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # metrics.jsonl: the abandoned steps 13..16 are dropped from the history, the rewind is
  # recorded, every step is logged once, with the reference run's values.
  hist = metrics.read_jsonl(str(tmp_path / 'a' / 'metrics.jsonl'))
  marks = [r for r in hist if 'rewind' in r]
  assert len(marks) == 1 and marks[0]['resumed_from'] == 12
  assert [r['resumed_from'] for r in hist if 'resumed_from' in r] == [12, 20]
  rows = [r for r in hist if 'loss' in r]
  want = [r for r in metrics.read_jsonl(str(tmp_path / 'b' / 'metrics.jsonl')) if 'loss' in r]
  assert [r['step'] for r in rows] == [r['step'] for r in want] == list(range(4, 25, 4))
  np.testing.assert_array_equal([r['loss'] for r in rows], [r['loss'] for r in want])
  assert [h['step'] for h in got.history] == [24]  # this start's
  raw = metrics.read_jsonl(str(tmp_path / 'a' / 'metrics.jsonl'), raw=True)
  assert any(r['step'] == 16 and 'loss' in r for r in raw)  # the spike's window, kept raw
  assert rows[-1]['rewinds'] == 1.0

  # Every checkpoint restores; those after the rewind equal the reference run's.
  a = ckpt_lib.Checkpointer(str(tmp_path / 'a'), cfg, read_only=True)
  b = ckpt_lib.Checkpointer(str(tmp_path / 'b'), cfg, read_only=True)
  assert a.all_steps() == b.all_steps() == [4, 8, 12, 16, 20, 24]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          got.state['params'])
  for step in (16, 20):
    pa, pb = a.restore_params(abstract, step), b.restore_params(abstract, step)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_spikes_stop_the_run_or_exhaust_the_rewinds(text, tmp_path, monkeypatch):
  _serve(monkeypatch, _batches(40, poison={13}))
  cfg = _cfg(text)  # on_spike=stop
  cfg.train.loss_spike.update(factor=2.0, window=8)
  with pytest.raises(loop.TrainingError, match=r'above train.loss_spike.factor 2 x the mean '
                     r'.* at step 14; last checkpoint: step 12 in '):
    loop.train(cfg, str(tmp_path / 'stop'))
  # Poison everywhere after step 12: every rewind meets another spike.
  _serve(monkeypatch, _batches(80, poison=set(range(12, 80))))
  cfg = _cfg(text, on_spike='rewind')
  cfg.train.loss_spike.update(factor=2.0, window=8, skip_batches=2, max_rewinds=2)
  with pytest.raises(loop.TrainingError, match=r'after 2 rewinds \(train.loss_spike.max_rewinds\)'):
    loop.train(cfg, str(tmp_path / 'many'))
  lines = [json.loads(x) for x in open(tmp_path / 'many' / 'metrics.jsonl')]
  assert sum('rewind' in r for r in lines) == 2


@pytest.mark.slow
def test_a_poisoned_document_in_the_corpus_triggers_a_rewind(text, tmp_path):
  """Real data: a document of random characters in the middle of a JSONL corpus (read in
  order) drives the loss far up; the run rewinds past it and ends as well trained as the
  batches around it allow."""
  docs = [p.read_text() for p in sorted((text / 'text').glob('*.txt'))]
  rng = np.random.default_rng(0)
  poison = ''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyzQWXZ0123456789{}[]()<>'), 800))
  with open(tmp_path / 'train.jsonl', 'w', encoding='utf-8') as f:
    for d in docs[:8] + [poison] + docs[8:36]:
      f.write(json.dumps({'text': d}) + '\n')
  with open(tmp_path / 'validation.jsonl', 'w', encoding='utf-8') as f:
    for d in docs[36:]:
      f.write(json.dumps({'text': d}) + '\n')
  cfg = _cfg(text, on_spike='rewind', steps=32)
  cfg.data.update(source='jsonl', files=str(tmp_path / '{split}.jsonl'), shuffle=False)
  cfg.train.loss_spike.update(factor=1.8, window=8, skip_batches=6)
  res = loop.train(cfg, str(tmp_path / 'w'))
  meta = ckpt_lib.Checkpointer(str(tmp_path / 'w'), cfg, read_only=True).read_meta()
  (rewind,) = meta['rewinds']
  first, end = rewind['skipped_batches']
  assert rewind['restored_step'] == first and end - first >= 6 and first < rewind['step'] <= end
  assert meta['data_batches'] == 32 + end - first
  losses = [h['loss'] for h in res.history]
  assert max(losses) < 6.0 and losses[-1] < 3.2, losses  # no trace of the poison


@pytest.mark.slow
def test_a_spike_before_any_checkpoint_stops_the_run(text, tmp_path, monkeypatch):
  _serve(monkeypatch, _batches(40, poison={13}))
  cfg = _cfg(text, on_spike='rewind')
  cfg.checkpoint.every = 100
  cfg.train.loss_spike.update(factor=2.0, window=8)
  with pytest.raises(loop.TrainingError, match=r'at step 14, and no checkpoint before it to '
                     r'rewind to \(train.on_spike=rewind\): save one sooner'):
    loop.train(cfg, str(tmp_path / 'w'))
