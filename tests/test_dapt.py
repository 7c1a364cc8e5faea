"""Domain-adaptive continued pretraining: init_from, data mixtures, per-domain evals."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import sharding, weights
from lmjax.data import pipeline, tokenizer as tokenizer_lib
from lmjax.train import compat, loop, objectives
from lmjax.train import metrics as metrics_lib
from lmjax.train import state as state_lib
from util import tiny_config, write_corpus

VOCAB = 384  # room for sentencepiece's byte fallback


def write_domain(root, n_files=30, seed=1):
  """A second corpus, unlike write_corpus's: array code."""
  rng = np.random.default_rng(seed)
  ops = 'jnp.dot jnp.sum jax.nn.relu jnp.tanh jax.lax.scan jnp.einsum'.split()
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n_files):
    lines = [f'import jax  # module {i}']
    for j in range(int(rng.integers(15, 50))):
      lines.append(f'x_{j} = {rng.choice(ops)}(w_{i}, x_{max(j - 1, 0)}) + {j}')
    (root / f'mod_{i:03d}.py').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(root / '*.py')


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp('dapt')
  return dict(general=write_corpus(root / 'general', n_files=40),
              domain=write_domain(root / 'domain'), data_dir=str(root / 'tfds'))


def _base(corpora, text_glob):
  cfg = tiny_config(vocab_size=VOCAB)
  cfg.data.update(source='local_text', text_glob=text_glob, data_dir=corpora['data_dir'],
                  val_fraction=0.1)
  cfg.tokenizer.update(vocab_size=VOCAB, max_sentences=20_000)
  cfg.train.update(steps=4, log_every=1, eval_every=0)
  cfg.optim.update(lr=3e-3, warmup_steps=2)
  cfg.checkpoint.update(every=0, keep=10, async_save=True)
  cfg.mesh.update(data=-1)  # all 8 test devices, data parallel
  return cfg


@pytest.fixture(scope='module')
def source(corpora, tmp_path_factory):
  """A pretraining run on the general corpus (its own tokenizer), data parallel over 8."""
  workdir = str(tmp_path_factory.mktemp('source'))
  out = loop.train(_base(corpora, corpora['general']), workdir)
  return workdir, out.tokenizer.path


def _dapt(corpora, source_dir, **train):
  """Continued pretraining: general 1 : domain 3, on an fsdp x tensor x data mesh. Its
  own data.text_glob is the domain corpus, whose default tokenizer does not exist."""
  cfg = _base(corpora, corpora['domain'])
  cfg.init_from.path = source_dir
  cfg.data.mixture = dict(
      general=config_lib.data_source(text_glob=corpora['general'], weight=1.0),
      domain=config_lib.data_source(text_glob=corpora['domain'], weight=3.0))
  cfg.data.eval_sources = dict(held_out=config_lib.data_source(
      text_glob=corpora['general'], val_fraction=0.3))
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.train.update(**train)
  config_lib.validate(cfg)
  return cfg


def _params_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               jax.device_get(a), jax.device_get(b))


@pytest.mark.slow
def test_init_from_workdir_reshards_with_fresh_optimizer(corpora, source):
  src_dir, _ = source
  cfg = _dapt(corpora, src_dir)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = state_lib.make_setup(cfg, mesh)
  init = weights.open_init_source(cfg.init_from)
  assert (init.format, init.step) == ('lmjax', 4)
  state = state_lib.init_state(cfg, setup, params=init.load_params(cfg, setup))

  src_cfg = ckpt_lib.Checkpointer(src_dir, None, read_only=True).read_config()
  src_setup = state_lib.make_setup(src_cfg, sharding.make_mesh(src_cfg.mesh))
  want = ckpt_lib.Checkpointer(src_dir, src_cfg, read_only=True).restore(src_setup.abstract_state)
  assert dict(src_setup.mesh.shape)['data'] == 8 and dict(mesh.shape) == dict(
      data=2, fsdp=2, expert=1, sequence=1, tensor=2)
  _params_equal(state['params'], want['params'])
  # On the new mesh, with the new shardings; fresh optimizer state and step.
  for leaf, sh in zip(jax.tree.leaves(state['params']),
                      jax.tree.leaves(setup.state_shardings['params'])):
    assert leaf.sharding == sh
  assert int(state['step']) == 0 and int(want['step']) == 4
  for leaf in jax.tree.leaves(state['opt_state']):
    assert not np.any(np.asarray(leaf)), 'optimizer state is not fresh'
  assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(want['opt_state']))


@pytest.mark.slow
def test_dapt_run_metrics_tokenizer_and_start(corpora, source, tmp_path):
  src_dir, src_tok = source
  cfg = _dapt(corpora, src_dir, steps=2, eval_every=2, eval_batches=2)
  assert not os.path.exists(tokenizer_lib.default_path(cfg))
  workdir = str(tmp_path / 'dapt')
  out = loop.train(cfg, workdir)

  # The source run's tokenizer, no new one; recorded with the init source in the meta.
  assert out.tokenizer.path == src_tok
  assert not os.path.exists(tokenizer_lib.default_path(cfg))
  meta = ckpt_lib.Checkpointer(workdir, cfg, read_only=True).read_meta()
  assert meta['tokenizer'] == src_tok
  assert meta['init_from'] == {'path': os.path.abspath(src_dir), 'format': 'lmjax', 'step': 4}

  # Step 0 is the source model: its eval equals one of the source params on this mesh.
  mesh = out.setup.mesh
  src_params = weights.InitSource(src_dir, 'lmjax', 4, {}, src_tok).load_params(cfg, out.setup)
  objective = out.setup.objective
  want = objective.evaluate(objective.eval_step(out.setup), {'params': src_params},
                            out.tokenizer, mesh, 0, 1)
  assert [e['step'] for e in out.evals] == [0, 2]
  assert out.evals[0] == {'step': 0, **want}
  # Per-domain evals; eval_loss pools the mixture's two sources.
  e = out.evals[0]
  assert set(e) == {'step', 'eval_loss', 'eval_ppl', 'eval_tokens', 'eval/general/loss',
                    'eval/domain/loss', 'eval/held_out/loss'}
  lo, hi = sorted([e['eval/general/loss'], e['eval/domain/loss']])
  assert lo < e['eval_loss'] < hi
  # Fresh schedule (lr 0 at step 0 with warmup); per-source token counts cover every token.
  assert out.history[0]['lr'] == 0.0
  for row in out.history:  # (a window of 256 tokens may hold a single document)
    assert row['tokens/general'] + row['tokens/domain'] == (
        cfg.train.global_batch * cfg.data.seq_len)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert any('eval/domain/loss' in r for r in rows) and any('tokens/domain' in r for r in rows)


@pytest.mark.slow
def test_mixture_resume_is_identical(corpora, source, tmp_path):
  """20 steps straight = 10, then resume for 10: same losses, same per-source counts."""
  src_dir, src_tok = source
  straight = str(tmp_path / 'straight')
  loop.train(_dapt(corpora, src_dir, steps=20), straight)
  split = str(tmp_path / 'split')
  first = loop.train(_dapt(corpora, src_dir, steps=20), split, stop_after=10)
  assert first.stopped_early
  second = loop.train(_dapt(corpora, src_dir, steps=20), split)  # resumes; init_from ignored
  assert int(second.state['step']) == 20 and second.tokenizer.path == src_tok

  def losses(w):
    rows = metrics_lib.read_jsonl(os.path.join(w, 'metrics.jsonl'))
    return {r['step']: (r['loss'], r['tokens/domain']) for r in rows if 'loss' in r}
  a, b = losses(straight), losses(split)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  for step in range(1, 21):
    assert a[step] == b[step], f'step {step}: {a[step]!r} != {b[step]!r}'
  assert sum(v[1] for v in a.values()) > 0.5 * 20 * 8 * 32  # mostly domain tokens


def test_init_from_refuses_another_architecture(corpora, source, tmp_path):
  src_dir, _ = source
  cfg = _dapt(corpora, src_dir)
  cfg.model.update(n_layers=3, d_ff=96)
  with pytest.raises(config_lib.ConfigError,
                     match=r'different model architecture \(model.n_layers: source 2 vs config '
                           r'3, model.d_ff: source 128 vs config 96\)'):
    loop.train(cfg, str(tmp_path / 'other'))
  cfg = _dapt(corpora, str(tmp_path / 'nothing'))
  with pytest.raises(ckpt_lib.CheckpointError, match=r'init_from.path .*nothing.* does not exist'):
    loop.train(cfg, str(tmp_path / 'other2'))


# ---- The mixture pipeline -----------------------------------------------------------

def test_mixture_follows_the_weights_by_document(corpora, source):
  _, src_tok = source
  cfg = _dapt(corpora, '/unused')
  cfg.data.seq_len = 512
  cfg.data.mixture.general.weight = 0.25
  cfg.data.mixture.domain.weight = 0.75
  tok = tokenizer_lib.from_path(src_tok)
  it = pipeline.make_lm_iterator(cfg, tok, 'train', batch_size=8)
  docs = np.zeros(3, int)
  for _ in range(80):
    b = next(it)
    assert set(b) == set(pipeline.FEATURES) | {pipeline.SOURCE}
    src = b[pipeline.SOURCE]
    assert np.all((src > 0) == (b['segment_ids'] > 0))
    # A source is constant along each document segment.
    same = b['segment_ids'][:, 1:] == b['segment_ids'][:, :-1]
    assert np.all(src[:, 1:][same] == src[:, :-1][same])
    starts = (b['positions'] == 0) & (b['inputs'] == tok.bos_id)
    docs += np.bincount(src[starts], minlength=3)
  it.close()
  assert docs.sum() > 300 and docs[0] == 0
  names = list(config_lib.mixture_sources(cfg.data))  # ids 1, 2, ... by sorted name
  assert names == ['domain', 'general']
  assert docs[2] / docs.sum() == pytest.approx(0.25, abs=0.02)
  # Each named source alone, as the evals read it.
  for name in ('general', 'domain', 'held_out'):
    one = next(pipeline.make_lm_iterator(cfg, tok, 'validation', batch_size=2, source=name,
                                         repeat=False))
    assert pipeline.SOURCE not in one
  with pytest.raises(ValueError, match=r"no data source named 'nope'"):
    pipeline.make_lm_iterator(cfg, tok, 'validation', batch_size=2, source='nope')


def test_eval_runs_the_same_batches_on_every_process(corpora, source):
  """Each process runs exactly train.eval_batches eval steps (collectives), even when its
  share of the eval split holds fewer in one pass, and the shares differ."""
  _, src_tok = source
  cfg = _base(corpora, corpora['general'])
  cfg.train.update(eval_batches=16, global_batch=8)
  tok = tokenizer_lib.from_path(src_tok)
  one_pass = [sum(1 for _ in pipeline.make_lm_iterator(
      cfg, tok, 'validation', batch_size=4, process_index=p, process_count=2, repeat=False))
      for p in range(2)]
  assert one_pass[0] != one_pass[1] and max(one_pass) < cfg.train.eval_batches
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  calls = []

  def eval_step(params, batch):
    calls.append(batch['inputs'].shape)
    return jnp.sum(batch['loss_mask']), jnp.sum(batch['loss_mask'])

  for p in range(2):
    calls.clear()
    out = objectives.get(cfg).evaluate(eval_step, None, tok, mesh, p, 2)
    assert calls == [(4, cfg.data.seq_len)] * cfg.train.eval_batches
    assert out['eval_loss'] == 1.0


# ---- Config ---------------------------------------------------------------------------

def test_mixture_config_checks_and_round_trip(corpora):
  cfg = _dapt(corpora, '/src')
  again = config_lib.from_dict(cfg.to_dict())
  assert again.to_dict() == cfg.to_dict() and again.data.mixture.domain.weight == 3.0
  config_lib.apply_overrides(again, {'data.mixture.domain.weight': 0.5})
  assert config_lib.mixture_sources(again.data)['domain'][0] == 0.5
  resolved = config_lib.eval_sources(cfg.data)
  assert list(resolved) == ['domain', 'general', 'held_out']
  assert resolved['held_out'].val_fraction == 0.3 and resolved['domain'].val_fraction == 0.1
  assert resolved['general'].data_dir == corpora['data_dir']  # '' = cfg.data's

  def bad(message, **entries):
    c = _dapt(corpora, '/src')
    c.data.mixture = entries
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(c)

  bad(r'data.mixture.a.weight must be positive', a=config_lib.data_source(weight=0.0))
  bad(r'data.mixture.a: unknown config key \'wieght\' \(did you mean "weight"',
      a=dict(config_lib.data_source().to_dict(), wieght=1.0))
  bad(r"data.mixture.a: config key 'weight': .*'str'.* type <class 'float'>",
      a=dict(config_lib.data_source().to_dict(), weight='heavy'))
  bad(r'data.mixture.a lacks the fields .*build it with lmjax.config.data_source',
      a=dict(text_glob='x', weight=1.0))
  bad(r'data.mixture.a-b: a source name must be', **{'a-b': config_lib.data_source()})
  bad(r"data.mixture.a.tfds_name must be set", a=config_lib.data_source(source='tfds'))
  bad(r"data.eval_sources.held_out has the name of a data.mixture source",
      held_out=config_lib.data_source())
  with pytest.raises(config_lib.ConfigError,
                     match=r'data_source: Key "wieght" does not exist.* Did you mean "weight"'):
    config_lib.data_source(wieght=1.0)
  # The command line reaches a named source's fields, and only those.
  cfg = config_lib.load('configs/dapt_tiny.py', flags=['--config.data.mixture.domain.weight=2',
                                                       '--config.data.mixture.domain.source=jsonl',
                                                       '--config.data.mixture.domain.files=x'])
  assert cfg.data.mixture.domain.weight == 2.0 and cfg.data.mixture.domain.files == 'x'
  for flag, message in (
      ('--config.data.mixture.domain.val_frac=0.5', r"'data.mixture.domain.val_frac' \(did you "
       r'mean "val_fraction"'),
      ('--config.data.mixture.domian.weight=0.5', r"'data.mixture.domian.weight' \(did you "
       r'mean "domain"'),
      ('--config.data.mixture.extra.weight=0.5', r"unknown config key 'data.mixture.extra.weight'"),
      ('--config.data.mixture.domain.weight=heavy', r"could not convert string to float")):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.load('configs/dapt_tiny.py', flags=[flag])
  # A config file adds an entry to a group it starts from inside `unlocked()`.
  cfg = config_lib.build('configs/dapt_tiny.py')
  with cfg.data.eval_sources.unlocked():
    cfg.data.eval_sources.held_out = config_lib.data_source(text_glob='x', val_fraction=0.5)
  config_lib.validate(config_lib.lock(cfg))
  assert cfg.data.eval_sources.is_locked and cfg.data.mixture.general.is_locked


def test_dapt_tiny_config():
  cfg = config_lib.load('configs/dapt_tiny.py')
  assert cfg.init_from.path == '/tmp/lmjax_tiny' and set(cfg.data.mixture) == {'general',
                                                                                'domain'}
  assert config_lib.load('configs/dapt_tiny.py:/runs/base').init_from.path == '/runs/base'
  base = config_lib.load('configs/pretrain_tiny.py')
  assert not compat.arch_diff(base.model, cfg.model)


@pytest.mark.slow
def test_init_from_a_hugging_face_dir(corpora, source, tmp_path):
  """Export the source run to HF format, then start a run from that directory: its
  params (resharded) and its shipped tokenizer.model, step 0."""
  pytest.importorskip('safetensors')
  from lmjax import hf
  src_dir, src_tok = source
  hf_dir = str(tmp_path / 'hf')
  weights.export_workdir(src_dir, hf_dir)
  assert os.path.exists(os.path.join(hf_dir, 'tokenizer.model'))
  cfg = _dapt(corpora, hf_dir, steps=2, eval_every=0)
  init = weights.open_init_source(cfg.init_from)
  assert init.format == 'hf' and init.tokenizer_path == hf_dir  # its tokenizer files
  setup = state_lib.make_setup(cfg, sharding.make_mesh(cfg.mesh))
  got = init.load_params(cfg, setup)
  want = weights.InitSource(src_dir, 'lmjax', 4, {}, src_tok).load_params(cfg, setup)
  _params_equal(got, want)
  out = loop.train(cfg, str(tmp_path / 'run'))
  assert int(out.state['step']) == 2
  with open(out.tokenizer.path, 'rb') as a, open(src_tok, 'rb') as b:
    assert a.read() == b.read()  # the exported copy of the source's tokenizer
  meta = ckpt_lib.Checkpointer(str(tmp_path / 'run'), cfg, read_only=True).read_meta()
  assert meta['init_from']['format'] == 'hf'


@pytest.mark.slow
def test_init_from_a_hugging_face_moe_dir(corpora, source, tmp_path):
  """Continued pretraining of a mixture of experts written by transformers (Qwen3-MoE,
  with the source run's tokenizer beside it), experts split over a 4-way 'expert' axis:
  its params exactly, step 0, the router telemetry logged."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from lmjax import hf
  _, src_tok = source
  hf_dir = tmp_path / 'hf'
  config = transformers.Qwen3MoeConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
      max_position_embeddings=256)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(hf_dir))
  shutil.copyfile(src_tok, hf_dir / 'tokenizer.model')
  cfg = hf.config_from_hf(str(hf_dir), _dapt(corpora, str(hf_dir), steps=3, eval_every=0))
  cfg.mesh.update(data=2, fsdp=1, expert=4, tensor=1)
  assert cfg.model.moe.experts == 4 and cfg.model.qk_norm
  init = weights.open_init_source(cfg.init_from)
  assert init.format == 'hf'
  setup = state_lib.make_setup(cfg, sharding.make_mesh(cfg.mesh))
  got = init.load_params(cfg, setup)
  assert got['layers']['moe']['gate'].sharding.spec[1] == 'expert'
  _params_equal(got, hf.load_params(str(hf_dir), cfg, sharding.make_mesh(dict(data=1),
                                                                          jax.devices()[:1])))
  out = loop.train(cfg, str(tmp_path / 'run'))
  assert int(out.state['step']) == 3
  last = out.history[-1]
  assert np.isfinite(last['loss']) and 'moe/balance_loss' in last
  assert 'moe/layer1/load_max' in last and 'moe/expert3/load' in last
