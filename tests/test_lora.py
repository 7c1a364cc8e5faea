"""LoRA adapters: identity at init, unmerged == merged, logits parity with PEFT (Llama and
Qwen2, rsLoRA, merged export, adapter files), target selection, dropout, sharding."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmjax import hf, sharding
from lmjax.models import lora, transformer
from util import random_batch, tiny_config

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 16))


def _setup(rank=4, alpha=8.0, targets='all-linear', **lora_kw):
  cfg = tiny_config()
  cfg.lora.update(rank=rank, alpha=alpha, targets=targets, **lora_kw)
  model = transformer.build(ml_collections.FrozenConfigDict(cfg.model))
  graphdef, state = nnx.split(model)
  return cfg, graphdef, nnx.to_pure_dict(state)


def _random_b(adapters, seed=1, std=0.1):
  """Adapters with the same A and a random nonzero B."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [x if not np.all(np.asarray(x) == 0) else std * jax.random.normal(k, x.shape)
         for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, out)


def _logits(graphdef, params, tokens=TOKENS, **kw):
  return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens), **kw))


# ---- Model forward ---------------------------------------------------------------------

def test_zero_b_at_init_is_identity():
  cfg, graphdef, params = _setup(dropout=0.5)
  ad = lora.init_adapters(jax.random.key(0), cfg)
  for leaf in jax.tree.leaves({k: v['b'] for k, v in ad['layers']['attn'].items()}):
    assert leaf.dtype == jnp.float32 and not np.any(np.asarray(leaf))
  base = _logits(graphdef, params)
  np.testing.assert_array_equal(_logits(graphdef, params, adapters=ad, lora=cfg.lora), base)
  # Dropout on the adapter input changes nothing while B = 0 either.
  np.testing.assert_array_equal(
      _logits(graphdef, params, adapters=ad, lora=cfg.lora, dropout_rng=jax.random.key(3)),
      base)


@pytest.mark.parametrize('targets,scan', [('all-linear', True), ('q,v', True),
                                          ('layers/mlp/.*', False)])
def test_unmerged_equals_merged(targets, scan):
  cfg, graphdef, params = _setup(targets=targets)
  if not scan:
    cfg.model.scan_layers = False
    graphdef, _ = transformer.abstract(ml_collections.FrozenConfigDict(cfg.model))
  ad = _random_b(lora.init_adapters(jax.random.key(0), cfg))
  unmerged = _logits(graphdef, params, adapters=ad, lora=cfg.lora)
  merged = _logits(graphdef, lora.merge(params, ad, cfg))
  base = _logits(graphdef, params)
  assert np.abs(unmerged - base).max() > 1e-2  # the adapters matter
  assert np.abs(unmerged - merged).max() < 1e-5, np.abs(unmerged - merged).max()
  # merge leaves untargeted weights alone.
  m = lora.merge(params, ad, cfg)
  assert m['embed'] is params['embed']
  if targets == 'q,v':
    assert m['layers']['attn']['k'] is params['layers']['attn']['k']


def test_adapters_without_lora_config_refused():
  cfg, graphdef, params = _setup()
  ad = lora.init_adapters(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match='cfg.lora'):
    _logits(graphdef, params, adapters=ad)


def test_dropout_only_with_rng():
  cfg, graphdef, params = _setup(dropout=0.3)
  ad = _random_b(lora.init_adapters(jax.random.key(0), cfg))
  det = _logits(graphdef, params, adapters=ad, lora=cfg.lora)
  no_drop = cfg.lora.to_dict()
  no_drop['dropout'] = 0.0
  np.testing.assert_array_equal(det, _logits(graphdef, params, adapters=ad, lora=no_drop))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  d1 = _logits(graphdef, params, adapters=ad, lora=cfg.lora, dropout_rng=k1)
  assert np.abs(d1 - det).max() > 1e-3
  np.testing.assert_array_equal(
      d1, _logits(graphdef, params, adapters=ad, lora=cfg.lora, dropout_rng=k1))
  assert np.abs(d1 - _logits(graphdef, params, adapters=ad, lora=cfg.lora,
                             dropout_rng=k2)).max() > 1e-3


def test_rslora_scale():
  cfg, graphdef, params = _setup(rank=16, alpha=8.0)
  assert lora.scale(cfg) == 0.5
  cfg.lora.rslora = True
  assert lora.scale(cfg) == 2.0
  ad = _random_b(lora.init_adapters(jax.random.key(0), cfg), std=0.02)
  rs = _logits(graphdef, params, adapters=ad, lora=cfg.lora)
  cfg.lora.rslora = False   # alpha/sqrt(r) = (alpha/r)·sqrt(r): scale B by sqrt(r) = 4
  b4 = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 4 if p[-1].key == 'b' else x, ad)
  np.testing.assert_allclose(rs, _logits(graphdef, params, adapters=b4, lora=cfg.lora),
                             atol=1e-5)


def test_grads_and_bf16_base():
  cfg, graphdef, params = _setup(base_dtype='bfloat16')
  cfg.model.dtype = 'bfloat16'
  graphdef, _ = transformer.abstract(ml_collections.FrozenConfigDict(cfg.model))
  base = lora.base_params(params, cfg)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(base))
  ad = lora.init_adapters(jax.random.key(0), cfg)
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg).items()}

  def loss(ad):
    logits = nnx.merge(graphdef, base)(batch['inputs'], adapters=ad, lora=cfg.lora)
    lp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(lp, batch['targets'][..., None], -1))

  g = jax.jit(jax.grad(loss))(ad)
  for name in lora.TARGETS:
    ga, gb = (g['layers'][lora.TARGETS[name][0][1]][name][x] for x in 'ab')
    assert ga.dtype == gb.dtype == jnp.float32
    assert not np.any(np.asarray(ga))                      # B = 0: no gradient into A yet
    assert np.all(np.isfinite(gb)) and np.abs(gb).max() > 0


# ---- Targets, init, counts -------------------------------------------------------------

def test_target_selection():
  assert lora.select_targets('all-linear') == list(lora.TARGETS)
  assert lora.select_targets('v, q') == ['q', 'v']
  assert lora.select_targets(['q_proj', 'down_proj']) == ['q', 'down']
  assert lora.select_targets('layers/attn/(q|v)') == ['q', 'v']
  assert lora.select_targets('layers/mlp/.*') == ['gate', 'up', 'down']
  assert lora.select_targets('.*/(o|down)') == ['o', 'down']
  with pytest.raises(lora.LoraError, match='matches no projection'):
    lora.select_targets('layers/attn/x')
  with pytest.raises(lora.LoraError, match='unknown target'):
    lora.select_targets(['q', 'lm_head'])
  cfg, _, _ = _setup(targets='layers/attn/(q|v)')
  ad = lora.init_adapters(jax.random.key(0), cfg)
  assert set(ad['layers']) == {'attn'} and set(ad['layers']['attn']) == {'q', 'v'}
  assert lora.targets_of(ad) == ['q', 'v']
  cfg.lora.rank = 0
  with pytest.raises(lora.LoraError, match='lora.rank'):
    lora.validate(cfg)


def test_param_count_and_layouts():
  cfg, _, params = _setup(rank=4)
  ad = lora.init_adapters(jax.random.key(0), cfg)
  m = cfg.model
  h = m.d_model // m.n_heads
  fans = [(m.d_model, m.n_heads * h), (m.d_model, m.n_kv_heads * h), (m.d_model, m.n_kv_heads * h),
          (m.n_heads * h, m.d_model), (m.d_model, m.d_ff), (m.d_model, m.d_ff),
          (m.d_ff, m.d_model)]
  expected = m.n_layers * 4 * sum(i + o for i, o in fans)
  assert lora.adapter_param_count(cfg) == lora.adapter_param_count(ad) == expected
  # A @ B has the base weight's layout.
  for name, (path, _, _) in lora.TARGETS.items():
    a = ad[path[0]][path[1]][path[2]]
    w = params[path[0]][path[1]][path[2]]
    assert jax.eval_shape(lora._delta, a['a'], a['b']).shape == w.shape


def test_init_matches_peft_kaiming_uniform():
  torch = pytest.importorskip('torch')
  cfg, _, _ = _setup(rank=64, targets='o,down')
  ad = lora.init_adapters(jax.random.key(0), cfg)
  for name, fan_in in (('o', 64), ('down', 128)):
    a = np.asarray(ad['layers']['attn' if name == 'o' else 'mlp'][name]['a'])
    ref = torch.empty(64, fan_in)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))   # what PEFT does to lora_A
    bound = ref.abs().max().item()
    assert abs(bound - 1 / math.sqrt(fan_in)) < 0.02 / math.sqrt(fan_in)
    assert np.abs(a).max() <= 1 / math.sqrt(fan_in) + 1e-7
    assert np.abs(a).max() > 0.98 / math.sqrt(fan_in)
    np.testing.assert_allclose(a.std(), ref.std().item(), rtol=0.05)
    assert a[0].std() > 0 and not np.allclose(a[0], a[1])  # layers differ


# ---- Sharding --------------------------------------------------------------------------

def test_sharded_adapters_match_one_device():
  cfg, graphdef, params = _setup(rank=4)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  ad = _random_b(lora.init_adapters(jax.random.key(0), cfg))
  ref = _logits(graphdef, params, adapters=ad, lora=cfg.lora)

  mesh = sharding.make_mesh(cfg.mesh)
  rules = dict(cfg.rules)
  axes = lora.logical_axes(cfg)['layers']
  assert tuple(axes['attn']['q']['a']) == ('layers', 'embed', None)
  assert tuple(axes['attn']['q']['b']) == ('layers', None, 'heads', 'head_dim')
  assert tuple(axes['attn']['o']['a']) == ('layers', 'heads', 'head_dim', None)
  ad_sh = lora.shardings(cfg, mesh)
  assert ad_sh['layers']['attn']['q']['b'].spec[2] == 'tensor'
  assert ad_sh['layers']['mlp']['gate']['a'].spec[1] == 'fsdp'
  sharded_init = lora.init_adapters(jax.random.key(0), cfg, mesh)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(x.sharding)),
               sharded_init, ad_sh)
  np.testing.assert_array_equal(np.asarray(sharded_init['layers']['attn']['q']['a']),
                                np.asarray(ad['layers']['attn']['q']['a']))

  from lmjax.train import state as state_lib
  _, specs, shapes = state_lib.logical_param_specs(cfg)
  p_sh = sharding.tree_shardings(specs, shapes, mesh, rules)
  tokens = np.tile(TOKENS, (2, 1))   # batch 4 over data x fsdp
  tok_sh = sharding.batch_sharding(mesh, rules)

  def fwd(p, a, t):
    return nnx.merge(graphdef, p)(t, adapters=a, lora=cfg.lora)

  with sharding.use_mesh(mesh, rules):
    out = jax.jit(fwd, in_shardings=(p_sh, ad_sh, tok_sh))(
        jax.device_put(params, p_sh), jax.device_put(ad, ad_sh),
        jax.device_put(jnp.asarray(tokens), tok_sh))
  np.testing.assert_allclose(np.asarray(out)[:2], ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out)[2:], ref, atol=1e-5)


# ---- PEFT parity -----------------------------------------------------------------------

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6)
PEFT_CASES = {  # name: (HF config class, lora settings)
    'llama': ('LlamaConfig', dict(targets='all-linear', rank=4, alpha=8.0)),
    'qwen2_rslora': ('Qwen2Config', dict(targets='q,v,o,down', rank=4, alpha=16.0,
                                         rslora=True)),
}


def _make_hf(path, config_cls):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = getattr(transformers, config_cls)(**SIZES)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if 'norm' in name else 0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))


def _hf_model(path):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(str(path)).float().eval()


def _torch_logits(model):
  import torch
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


@pytest.mark.parametrize('case', list(PEFT_CASES))
def test_peft_parity(case, tmp_path):
  peft = pytest.importorskip('peft')
  config_cls, settings = PEFT_CASES[case]
  src = tmp_path / 'hf'
  _make_hf(src, config_cls)
  base_cfg = tiny_config()
  base_cfg.data.seq_len = 16
  base_cfg.lora.update(**settings)
  cfg = hf.config_from_hf(str(src), base_cfg)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  params = hf.load_params(str(src), cfg, mesh)
  graphdef, _ = transformer.abstract(ml_collections.FrozenConfigDict(cfg.model))
  ad = _random_b(lora.init_adapters(jax.random.key(0), cfg), std=0.05)
  ours = _logits(graphdef, params, adapters=ad, lora=cfg.lora)
  assert np.abs(ours - _logits(graphdef, params)).max() > 1e-2

  # Same A, B in a PEFT model: same logits.
  pc = lora.peft_config(cfg)
  lcfg = peft.LoraConfig(r=pc['r'], lora_alpha=pc['lora_alpha'],
                         target_modules=pc['target_modules'], use_rslora=pc['use_rslora'],
                         lora_dropout=0.0, task_type='CAUSAL_LM')
  pm = peft.get_peft_model(_hf_model(src), lcfg).eval()
  import torch
  sd = {k: torch.from_numpy(v) for k, v in lora.to_peft_state_dict(ad, cfg).items()}
  res = peft.set_peft_model_state_dict(pm, sd)
  assert not res.unexpected_keys
  assert not [k for k in res.missing_keys if 'lora_' in k]
  theirs = _torch_logits(pm)
  diff = np.abs(ours - theirs).max()
  assert diff < 1e-4, diff

  # PEFT's state dict (saved and live, with adapter names) maps back exactly.
  for sd in (peft.get_peft_model_state_dict(pm), pm.state_dict()):
    back = lora.from_peft_state_dict(sd, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, ad))

  # A saved adapter dir loads in PEFT with the same logits, and back into lmjax.
  adir = tmp_path / 'adapter'
  lora.save_peft_adapter(ad, cfg, str(adir), base_model_name_or_path=str(src))
  assert json.loads((adir / 'adapter_config.json').read_text())['use_rslora'] == cfg.lora.rslora
  loaded = peft.PeftModel.from_pretrained(_hf_model(src), str(adir)).eval()
  diff_loaded = np.abs(_torch_logits(loaded) - ours).max()
  assert diff_loaded < 1e-4, diff_loaded
  jax.tree.map(np.testing.assert_array_equal, lora.load_peft_adapter(str(adir), cfg),
               jax.tree.map(np.asarray, ad))

  # Merged export == PEFT's merge_and_unload.
  out = tmp_path / 'merged'
  hf.save_hf(lora.merge(params, ad, cfg), cfg, str(out))
  merged_ref = _torch_logits(pm.merge_and_unload())
  merged_ours = _torch_logits(_hf_model(out))
  diff_merged = np.abs(merged_ours - merged_ref).max()
  assert diff_merged < 1e-4, diff_merged
  assert np.abs(merged_ours - ours).max() < 1e-4
  assert np.abs(merged_ours - _torch_logits(_hf_model(src))).max() > 1e-2
  print(f'{case}: unmerged {diff:.2e}, adapter dir {diff_loaded:.2e}, merged {diff_merged:.2e}')
