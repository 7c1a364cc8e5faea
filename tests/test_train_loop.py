"""End to end through the loop: data -> steps -> eval -> checkpoints -> resume."""

import os
import shutil

import jax
import numpy as np
import pytest

from lmjax import checkpoint as ckpt_lib
from lmjax import provenance
from lmjax.train import loop
from lmjax.train import metrics as metrics_lib
from util import tiny_config, write_corpus


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  return write_corpus(root / 'text', n_files=40), str(root / 'tfds')


def _cfg(corpus, **train):
  glob_, data_dir = corpus
  cfg = tiny_config()
  cfg.data.update(source='local_text', text_glob=glob_, data_dir=data_dir, val_fraction=0.1)
  cfg.tokenizer.update(vocab_size=384, max_sentences=20_000)
  cfg.model.vocab_size = 384
  cfg.train.update(steps=20, log_every=1, eval_every=0)
  cfg.train.update(**train)
  cfg.checkpoint.update(every=5, keep=10, async_save=True)
  cfg.mesh.update(data=-1)  # all 8 test devices, data parallel
  cfg.optim.update(lr=3e-3, warmup_steps=2)
  return cfg


def _losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.mark.slow
def test_resume_is_bitwise_identical(corpus, tmp_path):
  straight = str(tmp_path / 'straight')
  loop.train(_cfg(corpus), straight)

  split = str(tmp_path / 'split')
  cfg = _cfg(corpus)
  first = loop.train(cfg, split, stop_after=10)
  assert int(first.state['step']) == 10 and first.stopped_early
  # A new "process": same workdir and config, resumes at 10.
  second = loop.train(_cfg(corpus), split)
  assert int(second.state['step']) == 20

  a, b = _losses(straight), _losses(split)
  assert sorted(a) == list(range(1, 21)) and sorted(b) == list(range(1, 21))
  for step in range(1, 21):
    assert a[step] == b[step], f'step {step}: {a[step]!r} != {b[step]!r}'
  pa = jax.device_get(ckpt_lib.Checkpointer(straight, cfg).restore(
      second.setup.abstract_state)['params'])
  pb = jax.device_get(second.state['params'])
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), pa, pb)
  # The loss fell, and keep-N / step layout is as configured.
  assert np.mean([a[s] for s in range(16, 21)]) < a[1] - 0.5
  assert ckpt_lib.Checkpointer(split, cfg).all_steps() == [5, 10, 15, 20]
  # What produced the run: in each checkpoint's meta, and per start in run.json.
  meta = ckpt_lib.Checkpointer(split, cfg).read_meta(20)['provenance']
  assert meta['packages'] == provenance.package_versions()
  assert meta['devices']['count'] == 8
  assert [s['step'] for s in provenance.read_starts(split)] == [0, 10]

  # Resumed from an earlier checkpoint (the later ones removed): metrics.jsonl says where,
  # and its reader keeps one record per step, the rerun's (equal, bit for bit).
  for step in (15, 20):
    shutil.rmtree(os.path.join(straight, 'checkpoints', str(step)))
  loop.train(_cfg(corpus), straight)
  path = os.path.join(straight, 'metrics.jsonl')
  raw = metrics_lib.read_jsonl(path, raw=True)
  assert sorted(r['step'] for r in raw if 'loss' in r) == sorted(list(range(1, 21)) +
                                                               list(range(11, 21)))
  rows = metrics_lib.read_jsonl(path)
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, 21))
  assert [r for r in rows if 'resumed_from' in r][0]['step'] == 10
  assert _losses(straight) == a


@pytest.mark.slow
def test_eval_metrics_and_sample(corpus, tmp_path):
  cfg = _cfg(corpus, steps=30, eval_every=15, eval_batches=2, sample_at_end=True)
  cfg.sample.update(prompt='def f_', max_new_tokens=8, temperature=0.0)  # greedy
  out = loop.train(cfg, str(tmp_path / 'run'))
  assert [e['step'] for e in out.evals] == [0, 15, 30]
  assert out.evals[-1]['eval_loss'] < out.evals[0]['eval_loss'] - 1.0
  # The sample is the trained model's greedy continuation, as lmjax.load gives it.
  import lmjax  # pylint: disable=import-outside-toplevel
  assert out.sample == lmjax.load(str(tmp_path / 'run')).generate('def f_', max_new_tokens=8)
  rows = metrics_lib.read_jsonl(str(tmp_path / 'run' / 'metrics.jsonl'))
  train_rows = [r for r in rows if 'loss' in r]
  for key in ('loss', 'grad_norm', 'lr', 'tokens_per_s', 'param_norm'):
    assert all(np.isfinite(r[key]) for r in train_rows), key
  assert train_rows[0]['lr'] == 0.0 and train_rows[2]['lr'] == pytest.approx(3e-3)
  assert os.listdir(tmp_path / 'run' / 'tb')  # TensorBoard event file written


@pytest.mark.slow
def test_nan_stops_with_clear_error(corpus, tmp_path):
  cfg = _cfg(corpus, steps=5)
  cfg.optim.update(lr=1e30, clip_norm=0.0, warmup_steps=0)  # diverges at once
  with pytest.raises(loop.TrainingError, match=r'non-finite loss .* at step \d+; last checkpoint'):
    loop.train(cfg, str(tmp_path / 'nan'))


@pytest.mark.slow
def test_resume_refuses_a_different_model(corpus, tmp_path):
  cfg = _cfg(corpus, steps=5)
  loop.train(cfg, str(tmp_path / 'run'))
  other = _cfg(corpus, steps=10)
  other.model.d_model = 32
  with pytest.raises(ckpt_lib.CheckpointError, match=r'model.d_model: checkpoint 64 vs config 32'):
    loop.train(other, str(tmp_path / 'run'))



@pytest.mark.slow
def test_checkpoint_reshards_onto_other_meshes(corpus, tmp_path):
  """Saved under fsdp=8; restored (the whole train state) under data=2 x tensor=4 and
  onto one device: identical values, the new meshes' shardings; a resume under another
  mesh continues the run."""
  from lmjax import sharding
  from lmjax.train import state as state_lib
  cfg = _cfg(corpus, steps=4)
  cfg.mesh.update(data=1, fsdp=8, tensor=1)
  workdir = str(tmp_path / 'run')
  first = loop.train(cfg, workdir, stop_after=2)
  saved = jax.device_get(first.state)
  q = first.state['params']['layers']['attn']['q']
  assert 'fsdp' in tuple(q.sharding.spec)
  ckpt = ckpt_lib.Checkpointer(workdir, None, read_only=True)
  for mesh_cfg, devices in (({'data': 2, 'fsdp': 1, 'tensor': 4}, jax.devices()),
                            ({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])):
    c = cfg.copy_and_resolve_references()
    c.mesh.update(**mesh_cfg)
    mesh = sharding.make_mesh(c.mesh, devices)
    setup = state_lib.make_setup(c, mesh)
    restored = ckpt.restore(setup.abstract_saved)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    rq = restored['params']['layers']['attn']['q']
    assert rq.sharding.mesh.shape == mesh.shape and len(rq.sharding.device_set) == len(devices)
  ckpt.close()
  other = cfg.copy_and_resolve_references()
  other.mesh.update(data=2, fsdp=1, tensor=4)
  resumed = loop.train(other, workdir)
  assert int(resumed.state['step']) == 4
  assert tuple(resumed.state['params']['layers']['attn']['q'].sharding.spec)[2] == 'tensor'
