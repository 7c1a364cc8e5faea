"""SFT through the one training loop: LoRA adapters on a frozen base, adapter-only
checkpoints with a pointer to the base, exact resume, exact-match eval, lmjax.load of an
SFT workdir, the merge tool and PEFT export; full fine-tuning SFT too."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import lmjax
from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import sharding, weights
from lmjax.models import lora
from lmjax.train import loop
from lmjax.train import metrics as metrics_lib
from lmjax.train import state as state_lib
from lmjax.train import step as step_lib
from util import pretrain_cfg, random_batch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tools'))
import merge_lora  # noqa: E402  pylint: disable=g-import-not-at-top


def _sft_cfg(base, **train):
  root, workdir = base
  cfg = pretrain_cfg(root)
  cfg.stage = 'sft'
  cfg.init_from.path = workdir
  cfg.lora.update(enabled=True, rank=4, alpha=8.0)
  cfg.sft.update(path='builtin:synthetic', task_sizes=dict(train=1000, validation=64, test=64),
                 eval_examples=8,
                 eval_max_new_tokens=12)
  cfg.data.seq_len = 96  # the longest task example (~80 tokens with this tokenizer) fits
  cfg.train.update(steps=8, eval_every=0, eval_batches=2)
  cfg.train.update(**train)
  cfg.optim.update(lr=1e-2, warmup_steps=0)
  cfg.checkpoint.update(every=4, keep=5)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  return cfg


def _base_params(base, mesh_cfg=None):
  params, _, _, _ = weights.load_params(base[1], mesh=sharding.make_mesh(
      mesh_cfg or {'data': 1, 'fsdp': -1, 'tensor': 1}))
  return jax.device_get(params)


def _losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.mark.slow
def test_lora_sft_trains_adapters_only_and_resumes_exactly(base, tmp_path):
  straight = str(tmp_path / 'straight')
  out = loop.train(_sft_cfg(base, eval_every=8), straight)
  setup = out.setup

  # Only the adapters trained: the base params are the source's, bit for bit; the
  # optimizer state mirrors the adapters (Adam's mu/nu), nothing of the base.
  assert setup.trainable == 'adapters' and setup.n_trainable == lora.adapter_param_count(
      _sft_cfg(base))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(out.state['params']),
               _base_params(base))
  mu = out.state['opt_state'][1][0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(out.state['adapters'])
  b = out.state['adapters']['layers']['attn']['q']['b']
  assert np.any(np.asarray(b)), 'B stayed zero: the adapters did not train'
  # Adapters shard like their base layer's output axes (q's heads on 'tensor').
  assert tuple(b.sharding.spec) == (None, None, 'tensor', None)

  # Adapter-only checkpoints with a pointer to the base; a small fraction of its size.
  ckpt = ckpt_lib.Checkpointer(straight, None, read_only=True)
  meta = ckpt.read_meta()
  ckpt.close()
  assert meta['init_from'] == {'path': base[1], 'format': 'lmjax', 'step': 3}
  with open(os.path.join(straight, 'checkpoints', '8', 'state', '_METADATA')) as f:
    saved = {eval(k)[0] for k in json.load(f)['tree_metadata']}  # pylint: disable=eval-used
  assert saved == {'step', 'adapters', 'opt_state'}

  # Metrics: overlong counts, eval loss on assistant tokens and exact match.
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(straight, 'metrics.jsonl'))
          if 'loss' in r]
  assert all('sft/dropped' in r and 'sft/truncated' in r for r in rows)
  assert [e['step'] for e in out.evals] == [0, 8]
  # The loop's exact match is the notebook API's on the same questions, same weights.
  em = lmjax.load(straight).exact_match('validation', limit=8, max_new_tokens=12)
  assert out.evals[-1]['eval/exact_match'] == em['accuracy'] and em['n'] == 8
  assert out.evals[-1]['eval_loss'] < out.evals[0]['eval_loss']

  # Stop at 4 + resume (a new process: the base is re-read through the meta pointer)
  # gives the same losses at every step and the same adapters.
  split = str(tmp_path / 'split')
  first = loop.train(_sft_cfg(base, eval_every=8), split, stop_after=4)
  assert first.stopped_early
  second = loop.train(_sft_cfg(base, eval_every=8), split)
  a, b_ = _losses(straight), _losses(split)
  assert sorted(a) == sorted(b_) == list(range(1, 9))
  assert all(a[s] == b_[s] for s in a), (a, b_)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(out.state['adapters']),
               jax.device_get(second.state['adapters']))


@pytest.fixture(scope='module')
def sft_run(base, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('sft_run') / 'sft')
  out = loop.train(_sft_cfg(base, steps=4), workdir)
  return workdir, out


@pytest.mark.slow
def test_load_merge_tool_and_init_from_of_an_sft_run(base, sft_run, tmp_path):
  workdir, out = sft_run
  adapters = jax.device_get(out.state['adapters'])
  want = jax.device_get(lora.merge(_base_params(base), adapters, _sft_cfg(base)))

  # lmjax.load of the SFT workdir: base + adapters, merged; its logits equal the
  # unmerged (training-time) forward.
  model = lmjax.load(workdir)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               jax.device_get(model.params), want)
  batch = random_batch(model.config, seed=3)
  unmerged = nnx.merge(model.graphdef, _base_params(base))(
      batch['inputs'], batch['positions'], batch['segment_ids'], adapters=adapters,
      lora=model.config.lora)
  merged = nnx.merge(model.graphdef, jax.device_get(model.params))(
      batch['inputs'], batch['positions'], batch['segment_ids'])
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5)
  # Greedy generation with the merged params follows the unmerged forward's argmax.
  prompt = model.encode('<|im_start|>user\nhi<|im_end|>\n')
  got = model.generate_ids([prompt], max_new_tokens=4, stop_tokens=()).tokens[0].tolist()
  ids, base_model = list(prompt), nnx.merge(model.graphdef, _base_params(base))
  for _ in range(4):
    x = np.asarray([ids], np.int32)
    logits = base_model(x, np.arange(len(ids), dtype=np.int32)[None], np.ones_like(x),
                        adapters=adapters, lora=model.config.lora)
    ids.append(int(np.argmax(logits[0, -1])))
  assert got == ids[len(prompt):]

  # The merge tool: a full checkpoint that needs no base; same params; a second write
  # into it is refused. PEFT export of the same adapters.
  merged_dir, peft_dir = str(tmp_path / 'merged'), str(tmp_path / 'peft')
  assert merge_lora.main(['--workdir', workdir, '--out', merged_dir, '--peft_dir', peft_dir]) == 0
  assert merge_lora.main(['--workdir', workdir, '--out', merged_dir]) == 2
  m2 = lmjax.load(merged_dir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(m2.params),
               jax.device_get(model.params))
  assert m2.tokenizer.path == model.tokenizer.path
  back, _ = lora.load_peft_adapter(peft_dir, _sft_cfg(base))
  jax.tree.map(np.testing.assert_array_equal, back, adapters)
  with open(os.path.join(peft_dir, 'adapter_config.json')) as f:
    pc = json.load(f)
  assert pc['r'] == 4 and pc['base_model_name_or_path'] == base[1]
  assert merge_lora.main(['--workdir', base[1], '--out', str(tmp_path / 'x')]) == 2

  # init_from an SFT workdir (e.g. the next stage) starts from the merged model.
  cfg = _sft_cfg(base)
  cfg.init_from.path = workdir
  source = weights.open_init_source(cfg.init_from)
  setup = state_lib.make_setup(cfg, sharding.make_mesh(cfg.mesh))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               jax.device_get(source.load_params(cfg, setup)), want)


@pytest.mark.slow
def test_resume_with_other_lora_settings_names_them(base, sft_run, tmp_path):
  workdir, _ = sft_run
  copy = str(tmp_path / 'sft_copy')
  shutil.copytree(workdir, copy)
  cfg = _sft_cfg(base, steps=6)
  cfg.lora.update(rank=8, targets='q,v')
  with pytest.raises(ckpt_lib.CheckpointError, match=r"lora.rank: checkpoint 4 vs config 8, "
                     r"lora.targets: checkpoint 'all-linear' vs config 'q,v'"):
    loop.train(cfg, copy)


@pytest.mark.slow
def test_lora_base_moved_is_a_clear_error(base, sft_run, tmp_path):
  workdir, _ = sft_run
  moved_base = str(tmp_path / 'moved_base')
  shutil.copytree(base[1], moved_base)
  copy = str(tmp_path / 'sft_copy')
  shutil.copytree(workdir, copy)
  shutil.rmtree(base[1])
  try:
    with pytest.raises(ckpt_lib.CheckpointError, match='base model of the LoRA checkpoint'):
      lmjax.load(copy)
  finally:
    shutil.copytree(moved_base, base[1])


@pytest.mark.slow
def test_lora_step_on_eight_devices_matches_one(base):
  cfg1 = _sft_cfg(base)
  cfg1.mesh.update(data=1, fsdp=1, tensor=1)
  cfg1.lora.update(dropout=0.1)
  cfg8 = _sft_cfg(base)
  cfg8.lora.update(dropout=0.1)
  batches = [random_batch(cfg1, seed=0, docs_per_row=2)] * 3
  results = []
  for cfg, devices in ((cfg1, jax.devices()[:1]), (cfg8, jax.devices())):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    setup = state_lib.make_setup(cfg, mesh)
    state = state_lib.init_state(cfg, setup)  # random base: the same on any mesh
    step = step_lib.make_train_step(cfg, setup)
    losses = []
    for b in batches:
      state, m = step(state, sharding.place_batch(b, mesh, cfg.rules))
      losses.append(float(m['loss']))
    results.append((losses, jax.device_get(state['adapters'])))
  (l1, a1), (l8, a8) = results
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert l1[-1] < l1[0]
  diffs = np.concatenate([np.abs(x - y).ravel() for x, y in
                          zip(jax.tree.leaves(a1), jax.tree.leaves(a8))])
  assert diffs.max() < 5e-4 and np.median(diffs) < 1e-6


@pytest.mark.slow
def test_full_finetuning_sft_bf16_base_and_train_params(base, tmp_path):
  cfg = _sft_cfg(base, steps=2)
  cfg.lora.enabled = False
  out = loop.train(cfg, str(tmp_path / 'full'))
  assert out.setup.trainable == 'params' and 'adapters' not in out.state
  changed = jax.tree.map(lambda x, y: bool(np.any(x != y)),
                         jax.device_get(out.state['params']), _base_params(base, cfg.mesh))
  assert all(jax.tree.leaves(changed))

  cfg = _sft_cfg(base, steps=2)
  cfg.lora.base_dtype = 'bfloat16'
  out = loop.train(cfg, str(tmp_path / 'bf16'))
  assert {x.dtype for x in jax.tree.leaves(out.state['params'])} == {np.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(out.state['adapters'])} == {np.dtype('float32')}
  assert np.isfinite(out.history[-1]['loss'])

  # train_params (PEFT's modules_to_save): the embedding and the final norm train fully
  # with the adapters, are checkpointed with them and replace the base's when merged.
  cfg = _sft_cfg(base, steps=2)
  cfg.lora.train_params = 'embed|final_norm/scale'
  workdir = str(tmp_path / 'full_embed')
  out = loop.train(cfg, workdir)
  full = jax.device_get(out.state['adapters']['full'])
  base_p = _base_params(base, cfg.mesh)
  assert set(full) == {'embed', 'final_norm'}
  assert np.any(full['embed'] != base_p['embed'])
  np.testing.assert_array_equal(jax.device_get(out.state['params'])['embed'], base_p['embed'])
  assert out.setup.n_trainable == lora.adapter_param_count(cfg) == (
      lora.adapter_param_count(_sft_cfg(base)) + base_p['embed'].size
      + base_p['final_norm']['scale'].size)
  model = lmjax.load(workdir)
  np.testing.assert_array_equal(jax.device_get(model.params)['embed'], full['embed'])
  with pytest.raises(lora.LoraError, match='modules_to_save'):
    lora.to_peft_state_dict(full and out.state['adapters'])
  cfg.lora.train_params = 'embedding'
  with pytest.raises(config_lib.ConfigError, match="train_params='embedding' matches no param"):
    config_lib.validate(cfg)


@pytest.mark.slow
def test_sft_config_errors_name_the_field(base):
  cfg = _sft_cfg(base)
  cfg.init_from.path = ''
  with pytest.raises(config_lib.ConfigError, match='lora.enabled: LoRA adapts a pretrained'):
    config_lib.validate(cfg)
  cfg = _sft_cfg(base)
  cfg.lora.targets = 'layers/attn/zz'
  with pytest.raises(config_lib.ConfigError, match="lora.targets='layers/attn/zz' matches no"):
    config_lib.validate(cfg)
  cfg = _sft_cfg(base)
  cfg.stage = 'rl'
  with pytest.raises(config_lib.ConfigError, match="'stage' must be one of"):
    config_lib.validate(cfg)
  cfg = _sft_cfg(base)
  cfg.data.mixture = {'a': config_lib.data_source(weight=1.0)}
  with pytest.raises(config_lib.ConfigError, match="with stage='sft' the data is cfg.sft"):
    config_lib.validate(cfg)
