"""LoRA adapters: identity at init, unmerged == merged, logits parity with PEFT (Llama and
Qwen2, rsLoRA, merged export, adapter files), PEFT adapters read with their own
adapter_config.json (conflicts and unsupported fields refused), target selection,
dropout, sharding."""

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
from util import peft_adapter, random_batch, random_hf_model, tiny_config

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


@pytest.mark.slow
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


@pytest.mark.slow
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

@pytest.mark.slow
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
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  random_hf_model(getattr(transformers, config_cls)(**SIZES), path)


def _hf_model(path):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(str(path)).float().eval()


def _torch_logits(model):
  import torch
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


@pytest.mark.parametrize('case', list(PEFT_CASES))
@pytest.mark.slow
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
  jax.tree.map(np.testing.assert_array_equal, lora.load_peft_adapter(str(adir), cfg)[0],
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


# ---- PEFT adapters bring their own LoRA config ------------------------------------------

ADAPTER_CASES = {  # name: PEFT LoraConfig kwargs (lmjax's config keeps its defaults)
    'alpha32': dict(r=4, lora_alpha=32, target_modules='all-linear'),
    'rslora': dict(r=8, lora_alpha=16, use_rslora=True,
                   target_modules=['q_proj', 'k_proj', 'o_proj', 'down_proj']),
    'q_v': dict(r=4, lora_alpha=4, target_modules=['q_proj', 'v_proj']),
}


def _peft_adapter(src, out, **lora_kw):
  """A PEFT model on a new HF model in `src` (util.peft_adapter), saved to `out`."""
  return peft_adapter(_hf_model(src), out, **lora_kw)


def _hf_setup(src):
  base_cfg = tiny_config()
  base_cfg.data.seq_len = 16
  cfg = hf.config_from_hf(str(src), base_cfg)   # cfg.lora: lmjax's defaults
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  graphdef, _ = transformer.abstract(ml_collections.FrozenConfigDict(cfg.model))
  return cfg, graphdef, hf.load_params(str(src), cfg, mesh)


@pytest.mark.parametrize('case', list(ADAPTER_CASES))
def test_peft_adapter_config_is_read(case, tmp_path):
  pytest.importorskip('peft')
  src, adir = tmp_path / 'hf', tmp_path / 'adapter'
  _make_hf(src, 'LlamaConfig')
  pm = _peft_adapter(src, adir, **ADAPTER_CASES[case])
  theirs = _torch_logits(pm)
  cfg, graphdef, params = _hf_setup(src)
  assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora) == (8, 16.0, False)

  ad, lc = lora.load_peft_adapter(str(adir), cfg)
  kw = ADAPTER_CASES[case]
  assert (lc.rank, lc.alpha, lc.rslora) == (kw['r'], kw['lora_alpha'],
                                            kw.get('use_rslora', False))
  want = (list(lora.TARGETS) if kw['target_modules'] == 'all-linear'
          else lora.select_targets(kw['target_modules']))
  assert lora.select_targets(lc.targets) == lora.targets_of(ad) == want
  ours = _logits(graphdef, params, adapters=ad, lora=lc)
  merged = _logits(graphdef, lora.merge(params, ad, lc))
  for x in (ours, merged):
    assert np.abs(x - theirs).max() < 1e-4, np.abs(x - theirs).max()
  # The adapter's scale differs from cfg.lora's: under the defaults the logits are off.
  assert lora.scale(lc) != lora.scale(cfg)
  assert np.abs(_logits(graphdef, params, adapters=ad, lora=cfg.lora) - theirs).max() > 1e-2
  # Explicit settings that agree are accepted.
  explicit = dict(rank=kw['r'], alpha=kw['lora_alpha'], rslora=kw.get('use_rslora', False),
                  targets=','.join(want), dropout=0.1)
  ad2, lc2 = lora.load_peft_adapter(str(adir), cfg, lora=explicit)
  assert lc2.dropout == 0.1 and lc2.alpha == lc.alpha
  jax.tree.map(np.testing.assert_array_equal, ad2, ad)


def _lmjax_adapter(tmp_path, **settings):
  """An adapter saved by lmjax (alpha 32, rank 4, q and v unless `settings` say
  otherwise), its dir, and the default config it is read under."""
  cfg = tiny_config()
  saved = cfg.copy_and_resolve_references()
  saved.lora.update(**dict(dict(rank=4, alpha=32.0, targets='q,v'), **settings))
  ad = _random_b(lora.init_adapters(jax.random.key(0), saved))
  adir = tmp_path / 'adapter'
  lora.save_peft_adapter(ad, saved, str(adir))
  return adir, cfg


@pytest.mark.parametrize('explicit,message', [
    (dict(alpha=16.0), r"lora.alpha=16.0 \(set\) but adapter_config.json lora_alpha=32.0"),
    (dict(rank=8), r"lora.rank=8 \(set\) but adapter_config.json r=4"),
    (dict(rslora=True), r"lora.rslora=True \(set\) but adapter_config.json use_rslora=False"),
    (dict(targets='all-linear'), r"lora.targets='all-linear' \(set\) but adapter_config.json "
                                 r"target_modules=\['q_proj', 'v_proj'\]"),
    (dict(train_params='embed'), r"lora.train_params='embed' \(set\)"),
    (dict(alpah=16.0), r"lora=\['alpah'\] are not cfg.lora fields"),
])
def test_peft_adapter_conflict_with_explicit_setting(explicit, message, tmp_path):
  adir, cfg = _lmjax_adapter(tmp_path)
  cfg.lora.update(alpha=8.0, rank=16)   # cfg.lora's values are not explicit
  _, lc = lora.load_peft_adapter(str(adir), cfg)
  assert (lc.rank, lc.alpha, lc.targets) == (4, 32.0, 'q,v')
  with pytest.raises(lora.LoraError, match=message):
    lora.load_peft_adapter(str(adir), cfg, lora=explicit)


@pytest.mark.parametrize('change,message', [
    (dict(peft_type='PREFIX_TUNING'), "peft_type='PREFIX_TUNING'"),
    (dict(bias='all'), "bias='all'"),
    (dict(use_dora=True), 'use_dora=True'),
    (dict(lora_bias=True), 'lora_bias=True'),
    (dict(fan_in_fan_out=True), 'fan_in_fan_out=True'),
    (dict(modules_to_save=['lm_head']), "modules_to_save=\\['lm_head'\\]"),
    (dict(rank_pattern={'q_proj': 8}), 'rank_pattern='),
    (dict(alpha_pattern={'v_proj': 8}), 'alpha_pattern='),
    (dict(layers_to_transform=0), 'layers_to_transform=0'),
    (dict(layers_to_transform=[1]), 'layers_to_transform='),
    (dict(target_modules=['q_proj', 'v_proj', 'lm_head']), "'lm_head' adapts lm_head"),
    (dict(target_modules=['q_proj', 'v_proj', 'embed_tokens']), "adapts embed_tokens"),
    (dict(target_modules=['q_proj', 'v_proj', 'c_attn']), "'c_attn' names no projection"),
    (dict(target_modules='.*'), 'adapts embed_tokens, lm_head'),
    (dict(target_modules=r'model\.layers\.0\.self_attn\.(q|v)_proj'), 'in some layers only'),
    (dict(target_modules=['q_proj']), r'target_modules=\[.q_proj.\] \(q_proj\) but '
                                      r'adapter_model.safetensors holds LoRA weights of '
                                      r'q_proj, v_proj'),
    (dict(target_modules=['q_proj', 'v_proj', 'k_proj']), 'holds LoRA weights of q_proj, v_proj'),
    (dict(r=8), 'r=8 but adapter_model.safetensors holds rank-4 LoRA weights'),
])
def test_peft_adapter_unsupported_config_refused(change, message, tmp_path):
  adir, cfg = _lmjax_adapter(tmp_path)
  path = adir / 'adapter_config.json'
  pc = json.loads(path.read_text())
  path.write_text(json.dumps(dict(pc, **change)))
  with pytest.raises(lora.LoraError, match=message):
    lora.load_peft_adapter(str(adir), cfg)


def test_peft_adapter_targets_forms_and_base_mismatch(tmp_path):
  adir, cfg = _lmjax_adapter(tmp_path)
  path = adir / 'adapter_config.json'
  pc = json.loads(path.read_text())
  for targets in (['self_attn.q_proj', 'v_proj'], r'.*\.(q|v)_proj', None):
    path.write_text(json.dumps(dict(pc, target_modules=targets)))
    assert lora.load_peft_adapter(str(adir), cfg)[1].targets == 'q,v'
  path.write_text(json.dumps(pc))
  # A base of another shape is a clear error naming the tensor and the adapter's base.
  other = tiny_config(n_kv_heads=4)
  with pytest.raises(lora.LoraError, match=r'v_proj.lora_B has shape \(32, 4\), expected \(64, 4\) .*different base'):
    lora.load_peft_adapter(str(adir), other)
  other = tiny_config(n_layers=3)
  with pytest.raises(lora.LoraError, match=r'layers \[0, 1\], expected 0..2'):
    lora.load_peft_adapter(str(adir), other)
  with pytest.raises(FileNotFoundError, match='not a PEFT adapter directory'):
    lora.load_peft_adapter(str(tmp_path), cfg)
