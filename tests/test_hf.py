"""Hugging Face import/export: logits parity with transformers (Llama incl. Llama-3 RoPE
scaling and tied embeddings, Mistral, Qwen2), exact round trips, the source's config.json
and generation_config.json kept through import, training runs and export, sharded import
on an 8-device mesh, clear errors, and the tools/convert_hf.py CLI."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from lmjax import checkpoint as ckpt_lib  # noqa: E402
from lmjax import config as config_lib  # noqa: E402
import lmjax  # noqa: E402
from lmjax import hf, sharding, weights  # noqa: E402
from lmjax.data import formats  # noqa: E402
from lmjax.data import tokenizer as tokenizer_lib  # noqa: E402
from lmjax.models import reward, transformer  # noqa: E402
from lmjax.train import loop  # noqa: E402
from lmjax.train import state as state_lib  # noqa: E402
from util import tiny_config, write_corpus  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6)
LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
CASES = {  # name: (arch, config kwargs, save_pretrained max_shard_size)
    'llama': ('llama', {}, None),
    'llama3_tied': ('llama', dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
                    '20KB'),
    'mistral': ('mistral', dict(sliding_window=4096), None),
    'qwen2': ('qwen2', dict(rope_parameters=dict(rope_type='default', rope_theta=1e6)), None),
}
CONFIGS = {'llama': 'LlamaConfig', 'mistral': 'MistralConfig', 'qwen2': 'Qwen2Config'}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24))


def make_hf(path, case='llama', dtype=torch.float32, **overrides):
  """A random transformers model (every weight random, norms and biases included, so a
  swapped tensor shows), saved to `path`. Returns the model (float32, eval mode)."""
  arch, kwargs, shard = CASES[case]
  config = getattr(transformers, CONFIGS[arch])(**{**SIZES, **kwargs, **overrides})
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  model.to(dtype).save_pretrained(str(path), max_shard_size=shard or '50GB')
  return model.float()


def hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def lmjax_logits(params, cfg, tokens=TOKENS):
  graphdef, _ = transformer.abstract(state_lib.model_config(cfg))
  return np.asarray(nnx.merge(graphdef, params)(tokens))


def one_device_mesh():
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def read_tensors(path):
  """Every tensor of an HF dir, by name."""
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith('.safetensors'):
      with safe_open(os.path.join(path, f), framework='np') as st:
        out.update((k, st.get_tensor(k)) for k in st.keys())
  return out


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), \
        jax.tree_util.keystr(path)


# ---- Parity and round trips -----------------------------------------------------------

@pytest.mark.parametrize('case', list(CASES))
def test_import_export_parity(case, tmp_path):
  src, out = tmp_path / 'hf', tmp_path / 'out'
  model = make_hf(src, case)
  if CASES[case][2]:
    assert os.path.exists(src / hf.INDEX_FILE)  # sharded files
  ref = hf_logits(model)

  # HF -> lmjax: same logits.
  cfg = hf.config_from_hf(str(src))
  assert cfg.model.tie_embeddings == (case == 'llama3_tied')
  assert cfg.model.qkv_bias == (case == 'qwen2')
  assert cfg.model.rope_scaling.type == ('llama3' if case == 'llama3_tied' else 'none')
  params = hf.load_params(str(src), cfg, one_device_mesh())
  logits = lmjax_logits(params, cfg)
  assert np.abs(logits - ref).max() < TOL, np.abs(logits - ref).max()

  # lmjax -> HF: transformers loads it and gives the same logits; the tensors are the
  # original ones, bit for bit.
  hf.save_hf(params, cfg, str(out), arch=CASES[case][0], max_shard_bytes=40_000)
  assert os.path.exists(out / hf.INDEX_FILE)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(reloaded) is type(model)
  exported = hf_logits(reloaded)
  assert np.abs(exported - logits).max() < TOL, np.abs(exported - logits).max()
  original, written = read_tensors(src), read_tensors(out)
  tied_copy = {'lm_head.weight'} if cfg.model.tie_embeddings else set()
  assert set(written) == set(original) - tied_copy
  for name, x in written.items():
    assert np.array_equal(x, original[name]), name

  # lmjax -> HF -> lmjax: bit-exact, config included.
  assert hf.config_from_hf(str(out)).model.to_dict() == cfg.model.to_dict()
  assert_trees_equal(hf.load_params(str(out), cfg, one_device_mesh()), params)


def test_export_of_an_lmjax_model_round_trips(tmp_path):
  """A model made in lmjax (params in its own layout and config) survives
  lmjax -> HF -> lmjax exactly, for each arch that fits it, and loads into transformers
  with the same logits."""
  rng = np.random.default_rng(1)
  for arch, model in (('llama', {}), ('mistral', {'tie_embeddings': True}),
                      ('qwen2', {'qkv_bias': True})):
    cfg = tiny_config(vocab_size=128, d_ff=96, rope_theta=1e4, **model)
    _, _, shapes = state_lib.logical_param_specs(cfg)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (float(jax.tree_util.keystr(path).endswith("['scale']"))
                         + 0.1 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
    hf.save_hf(params, cfg, str(tmp_path / arch), arch=arch)
    back = hf.config_from_hf(str(tmp_path / arch), cfg)
    assert back.model.to_dict() == cfg.model.to_dict()
    assert_trees_equal(hf.load_params(str(tmp_path / arch), back, one_device_mesh()), params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / arch)).eval()
    assert type(reloaded).__name__ == hf.ARCHS[arch]
    diff = np.abs(hf_logits(reloaded) - lmjax_logits(params, cfg)).max()
    assert diff < TOL, diff


def test_bfloat16_checkpoints(tmp_path):
  """bf16 safetensors (as real checkpoints ship) read exactly, into either param dtype,
  and export back to bf16 bit for bit."""
  make_hf(tmp_path / 'hf', 'llama', dtype=torch.bfloat16)
  original = read_tensors(tmp_path / 'hf')
  assert original['model.embed_tokens.weight'].dtype == ml_dtypes.bfloat16
  cfg = hf.config_from_hf(str(tmp_path / 'hf'))
  p32 = hf.load_params(str(tmp_path / 'hf'), cfg, one_device_mesh())
  assert p32['embed'].dtype == np.float32
  np.testing.assert_array_equal(np.asarray(p32['layers']['mlp']['gate'][1]),
                                original['model.layers.1.mlp.gate_proj.weight'].T)
  cfg16 = hf.config_from_hf(str(tmp_path / 'hf'))
  cfg16.model.param_dtype = 'bfloat16'
  p16 = hf.load_params(str(tmp_path / 'hf'), cfg16, one_device_mesh())
  assert p16['embed'].dtype == jax.numpy.bfloat16
  hf.save_hf(p32, cfg, str(tmp_path / 'out'), dtype='bfloat16')
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['dtype'] == 'bfloat16'
  written = read_tensors(tmp_path / 'out')
  assert set(written) == set(original)
  for name, x in written.items():
    assert x.dtype == ml_dtypes.bfloat16 and np.array_equal(x, original[name]), name


# ---- The source's config.json and generation_config.json ------------------------------

# Not transformers' class defaults (Llama/Mistral: bos 1, eos 2; Qwen2: none), and longer
# than the sequences trained on (data.seq_len=256).
SOURCE = dict(bos_token_id=5, eos_token_id=7, pad_token_id=3, max_position_embeddings=512)


def _json(path):
  return json.loads(path.read_text())


def _changed(a, b):
  return {k for k in set(a) | set(b) if a.get(k, 'absent') != b.get(k, 'absent')}


@pytest.mark.parametrize('case', list(CASES))
def test_export_keeps_the_source_config(case, tmp_path):
  """export(import(x)) writes x's config.json back key for key (token ids,
  max_position_embeddings, RoPE parameters, sliding window, dtype and the rest) and x's
  generation_config.json; another --dtype changes the dtype field only."""
  src, work, out = tmp_path / 'hf', tmp_path / 'work', tmp_path / 'out'
  dtype = torch.bfloat16 if case == 'mistral' else torch.float32  # bf16 files stay bf16
  model = make_hf(src, case, dtype=dtype, **SOURCE)
  source, source_gen = _json(src / 'config.json'), _json(src / hf.GENERATION_FILE)
  base = config_lib.base_config()
  base.data.seq_len = 256
  base.mesh.update(data=1, fsdp=-1, tensor=1)
  hf.import_hf(str(src), str(work), base)
  weights.export_workdir(str(work), str(out))

  exported = _json(out / 'config.json')
  assert exported == source, _changed(exported, source)
  assert _json(out / hf.GENERATION_FILE) == source_gen
  assert (exported['bos_token_id'], exported['eos_token_id'], exported['pad_token_id'],
          exported['max_position_embeddings']) == (5, 7, 3, 512)
  original = read_tensors(src)
  for name, x in read_tensors(out).items():
    assert np.array_equal(x, original[name]), name

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(reloaded) is type(model) and reloaded.dtype == dtype
  c, g = reloaded.config, reloaded.generation_config
  assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.max_position_embeddings) == (
      5, 7, 3, 512)
  assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (5, 7, 3)
  assert getattr(c, 'sliding_window', None) == source.get('sliding_window')
  assert c.rope_parameters == source['rope_parameters']
  # Same logits as the source (both read in float32: bf16 files hold the same values).
  load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=torch.float32).eval()
  diff = np.abs(hf_logits(load(out)) - hf_logits(load(src))).max()
  assert diff < TOL, diff

  other = 'float32' if case == 'mistral' else 'bfloat16'
  weights.export_workdir(str(work), str(tmp_path / 'other'), dtype=other)
  exported = _json(tmp_path / 'other' / 'config.json')
  assert _changed(exported, source) == {'dtype'} <= set(hf.EXPORT_CHANGED_FIELDS)
  assert exported['dtype'] == other


def test_source_without_generation_config_or_with_legacy_keys(tmp_path):
  """A source without generation_config.json gets one with its config.json's token ids; a
  transformers 4 config.json (torch_dtype, rope_theta + rope_scaling) is kept as it was,
  its torch_dtype set when the files are written in another dtype (float16 here)."""
  src, work = tmp_path / 'hf', tmp_path / 'work'
  make_hf(src, 'llama3_tied', **SOURCE)
  os.remove(src / hf.GENERATION_FILE)
  legacy = _json(src / 'config.json')
  rope = legacy.pop('rope_parameters')
  legacy.update(torch_dtype=legacy.pop('dtype'), rope_theta=rope.pop('rope_theta'),
                rope_scaling=rope, transformers_version='4.45.0')
  (src / 'config.json').write_text(json.dumps(legacy))
  hf.import_hf(str(src), str(work))
  weights.export_workdir(str(work), str(tmp_path / 'out'))
  assert _json(tmp_path / 'out' / 'config.json') == legacy
  assert _json(tmp_path / 'out' / hf.GENERATION_FILE) == dict(
      bos_token_id=5, eos_token_id=7, pad_token_id=3)
  weights.export_workdir(str(work), str(tmp_path / 'f16'), dtype='float16')
  exported = _json(tmp_path / 'f16' / 'config.json')
  assert _changed(exported, legacy) == {'torch_dtype'} and 'dtype' not in exported
  assert exported['torch_dtype'] == 'float16'
  assert {x.dtype for x in read_tensors(tmp_path / 'f16').values()} == {np.dtype(np.float16)}
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out'))
  assert (reloaded.config.eos_token_id, reloaded.generation_config.eos_token_id) == (7, 7)
  assert reloaded.config.rope_parameters['rope_type'] == 'llama3'


def test_export_checks_the_model_against_the_source_config(tmp_path):
  """A model config that no longer matches the source's config.json, or another arch, is
  an error naming the field and the way out; without the source config (new_config) the
  export is made from the model config."""
  src, work = tmp_path / 'hf', tmp_path / 'work'
  make_hf(src, 'mistral', **SOURCE)
  cfg = hf.import_hf(str(src), str(work))
  params = hf.load_params(str(src), cfg, one_device_mesh())
  source = _json(src / 'config.json')
  with pytest.raises(hf.HFError, match=r"arch='llama' differs from the source config.json "
                     r"model_type='mistral'.*--new_config"):
    hf.save_hf(params, cfg, str(tmp_path / 'x'), arch='llama', hf_config=source)
  wrong = dict(source, vocab_size=160)
  with pytest.raises(hf.HFError, match=r'no longer matches the source config.json '
                     r'\(model.vocab_size: config 128 vs config.json 160\).*--new_config'):
    hf.save_hf(params, cfg, str(tmp_path / 'x'), hf_config=wrong)
  assert not os.path.exists(tmp_path / 'x')
  # From the model config (what a model trained from scratch gets).
  weights.export_workdir(str(work), str(tmp_path / 'new'), arch='llama', source_config=False)
  made = _json(tmp_path / 'new' / 'config.json')
  assert made['model_type'] == 'llama' and made['max_position_embeddings'] == 256
  assert 'eos_token_id' not in made and _json(tmp_path / 'new' / hf.GENERATION_FILE) == {}


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """An HF model (no tokenizer of its own) imported, then continued pretraining for two
  steps from the imported workdir with a sentencepiece tokenizer trained here; the source
  directory is deleted afterwards (later runs and exports must not need it)."""
  root = tmp_path_factory.mktemp('chain')
  src, work = root / 'hf', root / 'work'
  make_hf(src, 'llama3_tied', vocab_size=384, **SOURCE)
  files = dict(config=_json(src / 'config.json'), gen=_json(src / hf.GENERATION_FILE))
  tok = _write_tokenizer(root / 'sp.model', 320)
  base = tiny_config()
  base.data.update(source='local_text', text_glob=write_corpus(root / 'text', n_files=8),
                   data_dir=str(root / 'tfds'), val_fraction=0.1)
  base.tokenizer.update(path=tok.path, vocab_size=320)
  base.train.update(steps=2)
  cfg = hf.import_hf(str(src), str(work), base, mesh=one_device_mesh())
  cfg.init_from.path = str(work)
  loop.train(cfg, str(root / 'dapt'), devices=jax.devices()[:1])
  shutil.rmtree(src)
  return dict(files, root=root, cfg=cfg, tok=tok.path)


def _export_keeps_source(chain, run):
  out = chain['root'] / f'{run}_hf'
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    weights.export_workdir(str(chain['root'] / run), str(out))
  assert _json(out / 'config.json') == chain['config'], run
  assert _json(out / hf.GENERATION_FILE) == chain['gen'], run
  # The run's tokenizer (trained here) has other ids: the source's are kept, with a warning.
  assert any('disagree on token ids (bos_token_id 5 vs 2' in str(w.message) for w in caught)
  assert (out / hf.TOKENIZER_FILE).read_bytes() == open(chain['tok'], 'rb').read()
  return out


def test_source_config_survives_training(chain):
  """import -> continued pretraining (init_from the imported workdir) -> export: the
  source's config.json and generation_config.json, carried by the checkpoints' meta."""
  out = _export_keeps_source(chain, 'dapt')
  assert transformers.AutoModelForCausalLM.from_pretrained(str(out)).config.eos_token_id == 7
  # Without the source config: made from the model config and the run's tokenizer.
  weights.export_workdir(str(chain['root'] / 'dapt'), str(chain['root'] / 'new'),
                    source_config=False)
  made = _json(chain['root'] / 'new' / 'config.json')
  assert (made['bos_token_id'], made['eos_token_id'], made['pad_token_id']) == (2, 3, 0)
  assert made['max_position_embeddings'] == 64 * 8  # Llama-3 RoPE: original length x factor
  assert _json(chain['root'] / 'new' / hf.GENERATION_FILE) == dict(
      bos_token_id=2, eos_token_id=3, pad_token_id=0)


@pytest.mark.slow
def test_source_config_survives_lora_and_merge(chain):
  """A LoRA run from the continued-pretraining run (preempted and resumed: the resumed run
  carries its own checkpoint's meta on), and its merged checkpoint, export the source's
  config.json and generation_config.json too."""
  lora = chain['cfg'].copy_and_resolve_references()
  lora.init_from.path = str(chain['root'] / 'dapt')
  lora.tokenizer.path = ''  # inherited from the run it starts from
  lora.lora.update(enabled=True, rank=4, alpha=8.0)
  for stop_after in (1, None):  # preempted at step 1, then resumed
    loop.train(lora, str(chain['root'] / 'lora'), devices=jax.devices()[:1],
               stop_after=stop_after)
  weights.write_merged(str(chain['root'] / 'lora'), str(chain['root'] / 'merged'))
  for run in ('lora', 'merged'):
    _export_keeps_source(chain, run)


# ---- Sharded import -------------------------------------------------------------------

RULES_HEAD_DIM = dict(layers='data', heads=None, kv_heads=None, head_dim='tensor', vocab=None)


@pytest.mark.parametrize('case,rules,q_spec', [
    ('llama3_tied', {}, P(None, 'fsdp', 'tensor', None)),
    ('qwen2', {}, P(None, 'fsdp', 'tensor', None)),
    ('qwen2', RULES_HEAD_DIM, P('data', 'fsdp', None, 'tensor'))])
def test_sharded_import(case, rules, q_spec, tmp_path):
  """On a data=2 x fsdp=2 x tensor=2 mesh each leaf has its rule's sharding and the
  logits match; the second rule set splits layers and head_dim instead of heads."""
  model = make_hf(tmp_path, case)
  cfg = hf.config_from_hf(str(tmp_path))
  rules = dict(cfg.rules, **rules)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  params = hf.load_params(str(tmp_path), cfg, mesh, rules)
  _, specs, shapes = state_lib.logical_param_specs(cfg)
  expected = sharding.tree_shardings(specs, shapes, mesh, rules)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
    assert x.sharding == s, (jax.tree_util.keystr(path), x.sharding, s)
  assert params['layers']['attn']['q'].sharding.spec == q_spec
  unsharded = hf.load_params(str(tmp_path), cfg, one_device_mesh())
  assert_trees_equal(jax.device_get(params), jax.device_get(unsharded))
  with sharding.use_mesh(mesh, rules):
    logits = lmjax_logits(params, cfg)
  diff = np.abs(logits - hf_logits(model)).max()
  assert diff < TOL, diff


# ---- Errors ---------------------------------------------------------------------------

def _edit_config(path, **changes):
  c = json.loads((path / 'config.json').read_text())
  for k, v in changes.items():
    if v is None:
      c.pop(k, None)
    else:
      c[k] = v
  (path / 'config.json').write_text(json.dumps(c))


def test_mismatched_config_missing_or_misshapen_tensor(tmp_path):
  make_hf(tmp_path, 'llama')
  cfg = hf.config_from_hf(str(tmp_path))
  wrong = hf.config_from_hf(str(tmp_path))
  wrong.model.rope_theta = 1e6
  with pytest.raises(hf.HFError, match=r'model.rope_theta: config 1000000.0 vs config.json '
                     r'10000.0'):
    hf.load_params(str(tmp_path), wrong, one_device_mesh())
  file = str(tmp_path / 'model.safetensors')
  tensors = read_tensors(tmp_path)
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(hf.HFError, match=r"'model.layers.1.mlp.up_proj.weight' is missing "
                     r'from .*model.safetensors'):
    hf.load_params(str(tmp_path), cfg, one_device_mesh())
  tensors['model.layers.1.mlp.up_proj.weight'] = np.zeros((96, 64), np.float32)
  tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((64, 64), np.float32)
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(hf.HFError, match=r"'model.layers.0.self_attn.k_proj.weight' in "
                     r'.*model.safetensors has shape \(64, 64\), expected \(32, 64\)'):
    hf.load_params(str(tmp_path), cfg, one_device_mesh())
  tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((32, 64), np.float32)
  tensors['model.layers.0.self_attn.o_proj.bias'] = np.zeros((64,), np.float32)
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(hf.HFError, match='does not use: model.layers.0.self_attn.o_proj.bias'):
    hf.load_params(str(tmp_path), cfg, one_device_mesh())
  os.remove(file)
  with pytest.raises(hf.HFError, match='no model.safetensors'):
    hf.load_params(str(tmp_path), cfg, one_device_mesh())


def test_unsupported_configs(tmp_path):
  make_hf(tmp_path, 'llama')
  good = json.loads((tmp_path / 'config.json').read_text())
  bad = {
      "model_type='gemma'": dict(model_type='gemma'),
      'architectures': dict(architectures=['LlamaForTokenClassification']),
      "rope_parameters.rope_type='yarn'": dict(rope_parameters=dict(rope_type='yarn',
                                                                    factor=4.0)),
      "rope_scaling.rope_type='linear'": dict(rope_parameters=None,
                                              rope_scaling=dict(rope_type='linear', factor=2.0)),
      'attention_bias=true': dict(attention_bias=True),
      'mlp_bias=true': dict(mlp_bias=True),
      "hidden_act='gelu'": dict(hidden_act='gelu'),
  }
  for field, change in bad.items():
    (tmp_path / 'config.json').write_text(json.dumps(good))
    _edit_config(tmp_path, **change)
    with pytest.raises(hf.HFError, match=r'config\.json ' + field.replace('.', r'\.')
                       .replace('(', r'\(').replace('[', r'\[')):
      hf.config_from_hf(str(tmp_path))
  # A Mistral window shorter than the sequences trained on.
  (tmp_path / 'config.json').write_text(json.dumps(good))
  _edit_config(tmp_path, model_type='mistral', architectures=['MistralForCausalLM'],
               sliding_window=16)
  with pytest.raises(hf.HFError, match=r'sliding_window=16 is shorter than data.seq_len=256'):
    hf.config_from_hf(str(tmp_path))
  base = config_lib.base_config()
  base.data.seq_len = 16
  assert hf.config_from_hf(str(tmp_path), base).model.n_layers == 2
  # Legacy (transformers 4) keys read as the new ones.
  legacy = dict(good, rope_parameters=None, rope_theta=5e5,
                rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != 'rope_theta'})
  m = hf.model_overrides_from_hf(legacy)
  assert m['rope_theta'] == 5e5 and m['rope_scaling']['original_max_len'] == 64
  # Export: an arch that cannot hold the model.
  cfg = hf.config_from_hf(str(tmp_path), base)
  with pytest.raises(hf.HFError, match=r"arch='qwen2' needs q/k/v biases \(model.qkv_bias\), "
                     "which the model lacks; export as 'llama'"):
    hf.hf_config_from_model(cfg.model, 'qwen2')
  with pytest.raises(hf.HFError, match="arch='gpt2'"):
    hf.hf_config_from_model(cfg.model, 'gpt2')


def _write_tokenizer(path, vocab_size):
  words = 'the model data train loss step token batch shard mesh value return'.split()
  rng = np.random.default_rng(0)
  texts = [' '.join(rng.choice(words, 12)) + '\n' for _ in range(300)]
  return tokenizer_lib.train_sentencepiece(texts, str(path), vocab_size)


def test_tokenizer_vocab_larger_than_model(tmp_path):
  make_hf(tmp_path, 'llama')  # vocab 128
  tok = _write_tokenizer(tmp_path / 'tokenizer.model', 300)
  with pytest.raises(ValueError, match=r'tokenizer vocab_size 300 .* exceeds model.vocab_size 128'):
    hf.config_from_hf(str(tmp_path))
  cfg = config_lib.base_config()
  cfg.model.vocab_size = 128
  cfg.tokenizer.path = tok.path
  with pytest.raises(ValueError, match=r'300 .* exceeds model.vocab_size 128'):
    tokenizer_lib.load_tokenizer(cfg)


# ---- Workdirs and the CLI -------------------------------------------------------------

def _cli():
  spec = importlib.util.spec_from_file_location('convert_hf',
                                                os.path.join(ROOT, 'tools', 'convert_hf.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def test_convert_hf_cli_round_trip(tmp_path, capsys):
  src, work, out = tmp_path / 'hf', tmp_path / 'work', tmp_path / 'out'
  tok = _write_tokenizer(tmp_path / 'tokenizer.model', 320)  # smaller than the model's vocab
  model = make_hf(src, 'llama', vocab_size=384, bos_token_id=tok.bos_id,
                  eos_token_id=tok.eos_id, pad_token_id=tok.sp.pad_id())
  shutil.copyfile(tok.path, src / 'tokenizer.model')
  main = _cli()
  assert main(['import', f'--hf_dir={src}', f'--workdir={work}', '--config.data.seq_len=64',
               '--config.mesh.data=1', '--config.mesh.fsdp=-1']) == 0

  # The workdir holds a step-0 train state the loop can resume, with the tokenizer.
  ckpt = ckpt_lib.Checkpointer(str(work), None, read_only=True)
  cfg, meta = ckpt.read_config(), ckpt.read_meta()
  assert ckpt.all_steps() == [0] and cfg.data.seq_len == 64 and cfg.model.vocab_size == 384
  assert meta['tokenizer'] == str(work / 'tokenizer') == cfg.tokenizer.path  # a copy
  assert (work / 'tokenizer' / 'tokenizer.model').read_bytes() == tok.sp.serialized_model_proto()
  assert meta['init_from']['format'] == 'hf'
  setup = state_lib.make_setup(cfg, sharding.make_mesh(cfg.mesh))
  state = ckpt.restore(setup.abstract_state)
  ckpt.close()
  assert int(state['step']) == 0
  assert tokenizer_lib.load_tokenizer(cfg).vocab_size == 320
  diff = np.abs(lmjax_logits(state['params'], cfg) - hf_logits(model)).max()
  assert diff < TOL, diff

  assert main(['export', f'--workdir={work}', f'--out_dir={out}']) == 0
  assert (out / 'tokenizer.model').read_bytes() == (src / 'tokenizer.model').read_bytes()
  assert _json(out / 'config.json') == _json(src / 'config.json')
  assert _json(out / hf.GENERATION_FILE) == _json(src / hf.GENERATION_FILE)
  original = read_tensors(src)
  for name, x in read_tensors(out).items():
    assert np.array_equal(x, original[name]), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  diff = np.abs(hf_logits(reloaded) - hf_logits(model)).max()
  assert diff < TOL, diff
  # --new_config: from the model config (max_position_embeddings = data.seq_len).
  assert main(['export', f'--workdir={work}', f'--out_dir={tmp_path / "new"}',
               '--new_config']) == 0
  assert _json(tmp_path / 'new' / 'config.json')['max_position_embeddings'] == 64

  # Bad input: exit code 2 and the reason.
  capsys.readouterr()
  assert main(['import', f'--hf_dir={src}', f'--workdir={work}']) == 2
  assert 'already holds checkpoints' in capsys.readouterr().err
  assert main(['export', f'--workdir={work}', f'--out_dir={out}']) == 2
  assert 'already holds model files' in capsys.readouterr().err
  assert main(['export', f'--workdir={work}', f'--out_dir={out}', '--overwrite',
               '--step=5']) == 2
  assert 'no checkpoint for step 5' in capsys.readouterr().err
  assert main(['import', f'--hf_dir={tmp_path / "nothing"}', f'--workdir={tmp_path / "w2"}']) == 2
  assert 'no config.json' in capsys.readouterr().err
  res = subprocess.run([sys.executable, 'tools/convert_hf.py', 'export',
                        f'--workdir={tmp_path / "empty"}', f'--out_dir={tmp_path / "o2"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and 'no checkpoint found' in res.stderr, res.stderr


def _corrupt(path, how):
  """Rewrites a safetensors file as `how` ('truncated', 'corrupt header', 'garbage')."""
  data = path.read_bytes()
  n = int.from_bytes(data[:8], 'little')
  data = {'truncated': data[:len(data) // 2],
          'corrupt header': data[:8] + b'#' * n + data[8 + n:],
          'garbage': b'this is not a safetensors file\n' * 40}[how]
  path.write_bytes(data)


@pytest.mark.parametrize('how', ['truncated', 'corrupt header', 'garbage'])
def test_unreadable_safetensors_file_is_named(how, tmp_path, capsys):
  """Import (API and tools/convert_hf.py: exit code 2, one line, nothing written) and
  lmjax.load name the file that cannot be read."""
  import lmjax
  src, work = tmp_path / 'hf', tmp_path / 'work'
  make_hf(src, 'llama')
  _corrupt(src / hf.SINGLE_FILE, how)
  message = rf'{src / hf.SINGLE_FILE} is not a readable safetensors file \(SafetensorError: '
  with pytest.raises(hf.HFError, match=message):
    hf.import_hf(str(src), str(work))
  assert not work.exists()
  with pytest.raises(hf.HFError, match=message):
    lmjax.load(str(src))
  work.mkdir()  # an existing workdir is kept, without a checkpoints/ directory
  capsys.readouterr()
  assert _cli()(['import', f'--hf_dir={src}', f'--workdir={work}']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {src / hf.SINGLE_FILE} is not a readable safetensors file')
  assert err.count('\n') == 1 and os.listdir(work) == []


def test_unreadable_shard_or_index_is_named(tmp_path):
  src, work = tmp_path / 'hf', tmp_path / 'work'
  make_hf(src, 'llama3_tied')  # sharded: model.safetensors.index.json + shards
  index = json.loads((src / hf.INDEX_FILE).read_text())
  shard = src / sorted(set(index['weight_map'].values()))[-1]
  _corrupt(shard, 'truncated')
  with pytest.raises(hf.HFError, match=rf'{shard} is not a readable safetensors file'):
    hf.import_hf(str(src), str(work))
  assert not work.exists()
  (src / hf.INDEX_FILE).write_text('{"weight_map": ')
  with pytest.raises(hf.HFError, match=rf'{src / hf.INDEX_FILE} is not valid JSON'):
    hf.import_hf(str(src), str(work))
  (src / hf.INDEX_FILE).write_text('{"metadata": {}}')
  with pytest.raises(hf.HFError, match=rf'{src / hf.INDEX_FILE} has no "weight_map"'):
    hf.import_hf(str(src), str(work))
  (src / 'config.json').write_text('{"model_type": ')
  with pytest.raises(hf.HFError, match=rf'{src / "config.json"} is not valid JSON'):
    hf.import_hf(str(src), str(work))
  assert not work.exists()


def test_failed_import_removes_what_it_created(tmp_path, monkeypatch):
  """A failure after the checks (here: while the params are read) leaves no checkpoints/
  or tokenizer copy behind; an existing workdir and its files stay."""
  src, work = tmp_path / 'hf', tmp_path / 'work'
  make_hf(src, 'llama', vocab_size=384)
  shutil.copyfile(_write_tokenizer(tmp_path / 'tok.model', 320).path,
                  src / 'tokenizer.model')  # the model ships a tokenizer: copied on import

  def fail(*args, **kwargs):
    assert (work / 'checkpoints').is_dir() and (work / hf.TOKENIZER_DIR).is_dir()
    raise MemoryError('out of host memory')

  monkeypatch.setattr(hf, 'load_params', fail)
  with pytest.raises(MemoryError):
    hf.import_hf(str(src), str(work))
  assert not work.exists()
  work.mkdir()
  (work / 'notes.txt').write_text('mine')
  with pytest.raises(MemoryError):
    hf.import_hf(str(src), str(work))
  assert os.listdir(work) == ['notes.txt']


def test_convert_hf_cli_truncated_file_exit_code(tmp_path):
  src, work = tmp_path / 'hf', tmp_path / 'work'
  make_hf(src, 'llama')
  _corrupt(src / hf.SINGLE_FILE, 'truncated')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  env.pop('LMJAX_VERBOSE', None)
  res = subprocess.run([sys.executable, 'tools/convert_hf.py', 'import', f'--hf_dir={src}',
                        f'--workdir={work}'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 2, res.stderr[-3000:]
  (line,) = res.stderr.strip().splitlines()  # e.g. (SafetensorError: ... incomplete metadata,
  # file not fully covered); it may be truncated or corrupt: download it again
  assert line.startswith(f'error: {src / hf.SINGLE_FILE} is not a readable safetensors file '
                         '(SafetensorError: ')
  assert line.endswith('it may be truncated or corrupt: download it again'), line
  assert not work.exists()


# ---- Reward models (*ForSequenceClassification, one label) ---------------------------

def _hf_scores(model, tokens, mask):
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()


def _lmjax_scores(params, cfg, tokens, mask):
  graphdef, _ = transformer.abstract(state_lib.model_config(cfg))
  model = nnx.merge(graphdef, params)
  scores = model.scores(model.hidden(tokens, segment_ids=np.asarray(mask, np.int32)))
  return np.asarray(reward.last_token_rewards(scores, mask))


def _right_padded(pad, lengths=(24, 17, 9)):
  rng = np.random.default_rng(3)
  tokens, mask = np.full((len(lengths), 24), pad), np.zeros((len(lengths), 24), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(1, 128, n)  # never the padding id 0
    mask[i, :n] = 1
  return tokens, mask


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_reward_model_import_export_parity(arch, tmp_path):
  """A transformers *ForSequenceClassification (num_labels=1) imports as model.head=score
  and scores the same batch (read at each row's last non-padding token) within 1e-4;
  exported back, transformers loads it and scores the same, tensors bit for bit."""
  kwargs = CASES['qwen2' if arch == 'qwen2' else 'llama'][1]
  config = getattr(transformers, CONFIGS[arch])(**{**SIZES, **kwargs}, num_labels=1,
                                                pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if 'norm' in name else 0.1 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path / 'hf'))
  tokens, mask = _right_padded(pad=0)
  ref = _hf_scores(model, tokens, mask)

  cfg = hf.config_from_hf(str(tmp_path / 'hf'))
  assert cfg.model.head == 'score'
  params = hf.load_params(str(tmp_path / 'hf'), cfg, one_device_mesh())
  assert 'lm_head' not in params and params['score'].shape == (64, 1)
  got = _lmjax_scores(params, cfg, tokens, mask)
  np.testing.assert_allclose(got, ref, atol=1e-4)

  hf.save_hf(params, cfg, str(tmp_path / 'out'), hf_config=hf.read_hf_config(str(tmp_path / 'hf')))
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / 'out')).eval()
  assert type(reloaded) is type(model) and reloaded.config.pad_token_id == 0
  np.testing.assert_allclose(_hf_scores(reloaded, tokens, mask), got, atol=1e-4)
  # In a notebook: lmjax.load(...).reward(token ids), one sequence or a batch.
  m = lmjax.load(str(tmp_path / 'out'))
  seqs = [t[:int(k.sum())].tolist() for t, k in zip(tokens, mask)]
  np.testing.assert_allclose(m.reward(seqs), ref, atol=1e-4)
  assert m.reward(seqs[1]) == pytest.approx(float(ref[1]), abs=1e-4)
  original, written = read_tensors(tmp_path / 'hf'), read_tensors(tmp_path / 'out')
  assert set(written) == set(original) and 'score.weight' in written
  for name, x in written.items():
    assert np.array_equal(x, original[name]), name


def test_reward_model_made_in_lmjax_exports(tmp_path):
  """An lmjax reward model exports as LlamaForSequenceClassification with num_labels=1 and
  its tokenizer's pad id; transformers scores like lmjax."""
  cfg = tiny_config(vocab_size=320, d_ff=96, rope_theta=1e4, head='score')
  rng = np.random.default_rng(2)
  _, _, shapes = state_lib.logical_param_specs(cfg)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (float(jax.tree_util.keystr(path).endswith("['scale']"))
                       + 0.1 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
  tok = _write_tokenizer(tmp_path / 'tok.model', 300)
  hf.save_hf(params, cfg, str(tmp_path / 'out'), tokenizer_path=tok.path)
  c = json.load(open(tmp_path / 'out' / 'config.json'))
  assert c['architectures'] == ['LlamaForSequenceClassification']
  assert c['pad_token_id'] == tok.pad_id and c['id2label'] == {'0': 'LABEL_0'}
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / 'out')).eval()
  assert reloaded.config.num_labels == 1
  tokens, mask = _right_padded(pad=tok.pad_id)
  np.testing.assert_allclose(_hf_scores(reloaded, tokens, mask),
                             _lmjax_scores(params, cfg, tokens, mask), atol=1e-4)
  assert hf.config_from_hf(str(tmp_path / 'out'), cfg).model.to_dict() == cfg.model.to_dict()
  # A conversation is scored as reward training renders it: the whole chat, template and all.
  m = lmjax.load(str(tmp_path / 'out'))
  conv = [{'role': 'user', 'content': 'the model'}, {'role': 'assistant', 'content': 'data'}]
  ids = formats.encode(conv, m.tokenizer, formats.resolve_template(m.config.sft.template,
                                                                   m.tokenizer))[0]
  with torch.no_grad():
    want = float(reloaded(torch.tensor(ids[None].astype(np.int64))).logits[0, 0])
  assert m.reward(conv) == pytest.approx(want, abs=1e-4)
  assert m.reward([conv, 'the model data']) == pytest.approx(
      [want, m.reward(m.encode('the model data'))], abs=1e-6)
  make_hf(tmp_path / 'lm', 'llama')
  with pytest.raises(ValueError, match='not a reward model'):
    lmjax.load(str(tmp_path / 'lm')).reward([5, 6, 7])


def test_classifiers_with_several_labels_are_refused(tmp_path):
  config = transformers.LlamaConfig(**SIZES, num_labels=3)
  transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(
      str(tmp_path))
  with pytest.raises(hf.HFError, match='num_labels=3: only a single score'):
    hf.config_from_hf(str(tmp_path))
