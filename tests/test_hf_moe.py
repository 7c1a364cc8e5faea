"""Hugging Face parity for Qwen3 (QK-norm) and the mixtures of experts Mixtral,
Qwen2-MoE (gated shared expert) and Qwen3-MoE: import and export with logits equal to
transformers', bit-exact tensors both ways, greedy generation equal to transformers',
an import sharded with experts split over devices, LoRA on an MoE model's attention with
PEFT export, and the errors for what lmjax cannot represent."""

import json
import os

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lmjax import config as config_lib  # noqa: E402
from lmjax import generate as gen  # noqa: E402
from lmjax import hf, sharding  # noqa: E402
from lmjax.models import lora, transformer  # noqa: E402
from lmjax.train import state as state_lib  # noqa: E402
from test_hf import hf_logits, lmjax_logits, one_device_mesh, read_tensors  # noqa: E402
from util import random_hf_model, tiny_config  # noqa: E402

TOL = 1e-4
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6)
CASES = {  # name: (transformers config class, kwargs)
    'qwen3': ('Qwen3Config', dict(head_dim=16)),
    'mixtral': ('MixtralConfig', dict(num_local_experts=4, num_experts_per_tok=2)),
    'qwen2_moe': ('Qwen2MoeConfig', dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80,
                                         norm_topk_prob=False)),
    'qwen3_moe': ('Qwen3MoeConfig', dict(num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True,
                                         head_dim=16)),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24))


def make_hf(path, case, **overrides):
  """A random transformers model of `case` (every weight random, so a swapped tensor
  shows), saved to `path`. Returns the model (float32, eval mode)."""
  cls, kwargs = CASES[case]
  return random_hf_model(getattr(transformers, cls)(**{**SIZES, **kwargs, **overrides}), path)


@pytest.mark.parametrize('case', list(CASES))
def test_import_export_parity(case, tmp_path):
  src, out = tmp_path / 'hf', tmp_path / 'out'
  model = make_hf(src, case)
  ref = hf_logits(model)

  cfg = hf.config_from_hf(str(src))
  m = cfg.model
  assert m.qk_norm == case.startswith('qwen3')
  assert m.qkv_bias == (case == 'qwen2_moe')
  if case == 'qwen3':
    assert m.moe.experts == 0
  else:
    kw = CASES[case][1]
    assert m.moe.experts == kw.get('num_local_experts', kw.get('num_experts'))
    assert m.moe.renormalize == (case != 'qwen2_moe')
    assert m.moe.shared_d_ff == (80 if case == 'qwen2_moe' else 0)
    assert m.moe.aux_loss == model.config.router_aux_loss_coef
  params = hf.load_params(str(src), cfg, one_device_mesh())
  logits = lmjax_logits(params, cfg)
  assert np.abs(logits - ref).max() < TOL, np.abs(logits - ref).max()
  # Every dispatch gives the same logits (nothing dropped at a large capacity factor).
  for dispatch in ('dense', 'capacity'):
    if m.moe.experts:
      other = ml_collections.ConfigDict(cfg.to_dict())
      other.model.moe.update(dispatch=dispatch, capacity_factor=float(m.moe.experts))
      assert np.abs(lmjax_logits(params, other) - ref).max() < TOL, dispatch

  # lmjax -> HF: the same tensors bit for bit; transformers loads them, same logits.
  hf.save_hf(params, cfg, str(out), hf_config=hf.read_hf_config(str(src)))
  original, written = read_tensors(src), read_tensors(out)
  assert set(written) == set(original)
  for name, x in written.items():
    assert np.array_equal(x, original[name]), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(reloaded) is type(model)
  assert np.abs(hf_logits(reloaded) - logits).max() < TOL
  assert hf.config_from_hf(str(out)).model.to_dict() == m.to_dict()


@pytest.mark.parametrize('arch', ['mixtral', 'qwen2_moe', 'qwen3_moe', 'qwen3'])
def test_model_made_in_lmjax_exports_as_its_arch(arch, tmp_path):
  """An lmjax model exports (default arch: the one whose network it is), transformers
  reads it with the same logits, and it comes back exactly."""
  model = dict(vocab_size=128, d_ff=96, rope_theta=1e4, qk_norm=arch.startswith('qwen3'),
               qkv_bias=arch == 'qwen2_moe')
  cfg = tiny_config(**model)
  if arch != 'qwen3':
    cfg.model.moe.update(experts=4, top_k=2, d_ff=32 if arch != 'mixtral' else 0,
                         shared_d_ff=48 if arch == 'qwen2_moe' else 0,
                         renormalize=arch != 'qwen2_moe')
  assert hf.default_arch(cfg.model) == arch
  rng = np.random.default_rng(1)
  _, _, shapes = state_lib.logical_param_specs(cfg)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (float(jax.tree_util.keystr(path).endswith("['scale']"))
                       + 0.1 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
  hf.save_hf(params, cfg, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(reloaded).__name__ == hf.ARCHS[arch]
  diff = np.abs(hf_logits(reloaded) - lmjax_logits(params, cfg)).max()
  assert diff < TOL, diff
  back = hf.config_from_hf(str(tmp_path), cfg)
  assert back.model.to_dict() == cfg.model.to_dict()
  again = hf.load_params(str(tmp_path), back, one_device_mesh())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), params)


def test_greedy_generation_matches_transformers(tmp_path):
  model = make_hf(tmp_path, 'qwen3_moe')
  cfg = hf.config_from_hf(str(tmp_path))
  params = hf.load_params(str(tmp_path), cfg, one_device_mesh())
  graphdef, _ = transformer.abstract(state_lib.model_config(cfg))
  prompts = [list(TOKENS[0, :7]), list(TOKENS[1, :12])]
  ours = gen.generate(graphdef, params, prompts, max_new_tokens=10).tokens
  for prompt, row in zip(prompts, ours):
    with torch.no_grad():
      theirs = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                              min_new_tokens=10, pad_token_id=0)[0, len(prompt):].numpy()
    np.testing.assert_array_equal(row, theirs)


def test_import_with_experts_sharded(tmp_path):
  """Experts split over a 4-way 'expert' mesh axis (x 2 data): each expert weight is
  sharded along its experts dim, and the logits equal transformers'."""
  model = make_hf(tmp_path, 'mixtral')
  cfg = hf.config_from_hf(str(tmp_path))
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
  params = hf.load_params(str(tmp_path), cfg, mesh, cfg.rules)
  gate = params['layers']['moe']['gate']
  assert gate.shape == (2, 4, 64, 96)
  assert gate.sharding.spec[1] == 'expert'
  assert gate.addressable_shards[0].data.shape == (2, 1, 64, 96)
  with sharding.use_mesh(mesh, cfg.rules):
    logits = lmjax_logits(params, cfg)
  assert np.abs(logits - hf_logits(model)).max() < TOL


@pytest.mark.slow
def test_lora_on_moe_attention_exports_to_peft(tmp_path):
  """LoRA on the attention projections of an MoE model: PEFT (all-linear on its
  attention) with the same A, B gives the same logits; MLP targets are refused."""
  peft = pytest.importorskip('peft')
  src = tmp_path / 'hf'
  make_hf(src, 'mixtral')
  base = tiny_config()
  base.data.seq_len = 32
  base.lora.update(enabled=True, rank=4, alpha=8, targets='all-linear')
  base.init_from.path = str(src)
  cfg = hf.config_from_hf(str(src), base)
  assert lora.select_targets(cfg.lora.targets, moe=True) == ['q', 'k', 'v', 'o']
  params = hf.load_params(str(src), cfg, one_device_mesh())
  ad = lora.init_adapters(jax.random.key(0), cfg)
  ad = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape)
                    .astype(np.float32), ad)
  graphdef, _ = transformer.abstract(state_lib.model_config(cfg))
  model = nnx.merge(graphdef, params)
  ours = np.asarray(model(TOKENS, adapters=ad, lora=cfg.lora))
  assert np.abs(ours - np.asarray(model(TOKENS))).max() > 1e-2
  adir = tmp_path / 'adapter'
  lora.save_peft_adapter(ad, cfg, str(adir), base_model_name_or_path=str(src))
  targets = json.loads((adir / 'adapter_config.json').read_text())['target_modules']
  assert sorted(targets) == ['k_proj', 'o_proj', 'q_proj', 'v_proj']
  base_model = transformers.AutoModelForCausalLM.from_pretrained(str(src)).float().eval()
  loaded = peft.PeftModel.from_pretrained(base_model, str(adir)).eval()
  diff = np.abs(hf_logits(loaded) - ours).max()
  assert diff < TOL, diff
  # Merged export == PEFT's merge_and_unload.
  hf.save_hf(lora.merge(params, ad, cfg), cfg, str(tmp_path / 'merged'))
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'merged')).eval()
  assert np.abs(hf_logits(merged) - ours).max() < TOL

  base.lora.targets = 'q,gate'
  with pytest.raises(config_lib.ConfigError, match='mixture-of-experts model has no dense MLP'):
    hf.config_from_hf(str(src), base)


def _edit_config(path, **changes):
  c = json.loads((path / 'config.json').read_text())
  c.update(changes)
  (path / 'config.json').write_text(json.dumps(c))


def test_unsupported_moe_configs(tmp_path):
  make_hf(tmp_path, 'qwen3_moe')
  _edit_config(tmp_path, mlp_only_layers=[1])
  with pytest.raises(hf.HFError, match='mlp_only_layers'):
    hf.config_from_hf(str(tmp_path))
  _edit_config(tmp_path, mlp_only_layers=[], decoder_sparse_step=2)
  with pytest.raises(hf.HFError, match='decoder_sparse_step'):
    hf.config_from_hf(str(tmp_path))
  _edit_config(tmp_path, decoder_sparse_step=1, num_experts=None, num_local_experts=None)
  with pytest.raises(hf.HFError, match='num_experts'):
    hf.config_from_hf(str(tmp_path))
  # An arch whose network differs from the model's is refused on export.
  cfg = tiny_config(vocab_size=128)
  cfg.model.moe.update(experts=4, top_k=2)
  with pytest.raises(hf.HFError, match="export as 'mixtral'"):
    hf.hf_config_from_model(cfg.model, 'llama')
  with pytest.raises(hf.HFError, match='QK-norm'):
    hf.hf_config_from_model(cfg.model, 'qwen3_moe')


def test_convert_hf_knows_every_arch():
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location('convert_hf',
                                                os.path.join(root, 'tools', 'convert_hf.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert set(mod.ARCHS) == set(hf.ARCHS)
