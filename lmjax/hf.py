"""Hugging Face checkpoints: import and export Llama, Mistral, Qwen2, Qwen3 and the
mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE, without torch.

    cfg = hf.config_from_hf('/ckpt/Llama-3.2-1B')              # lmjax config for the model
    params = hf.load_params('/ckpt/Llama-3.2-1B', cfg, mesh)   # sharded, read slice by slice
    hf.save_hf(params, cfg, '/out/hf',                         # back to safetensors
               hf_config=hf.read_hf_config('/ckpt/Llama-3.2-1B'),
               generation_config=hf.read_generation_config('/ckpt/Llama-3.2-1B'))
    hf.import_hf(hf_dir, workdir)           # into a workdir's step-0 checkpoint
    weights.export_workdir(workdir, out_dir)  # a workdir's params back (lmjax/weights.py)

Layouts, per layer (lmjax stacks layer parameters on a leading 'layers' axis):
  q, k, v    [d, n, h] <- q_proj.weight [n*h, d]    o       [n, h, d] <- o_proj.weight [d, n*h]
  gate, up   [d, f]    <- gate_proj.weight [f, d]   down    [f, d]    <- down_proj.weight [d, f]
  embed      [V, d]    =  embed_tokens.weight       lm_head [d, V]    <- lm_head.weight [V, d]
  q/k/v_bias [n, h]    <- q_proj.bias [n*h]         norm scales [d]   =  *norm.weight
  q/k_norm   [h]       =  self_attn.q/k_norm.weight (Qwen3)
MoE layers (`moe`; expert weights stacked [layers, experts, ...], read expert by expert):
  router     [d, E]    <- mlp.gate.weight [E, d]    (Mixtral: block_sparse_moe.gate)
  gate, up   [E, d, f] <- mlp.experts.{j}.gate_proj / up_proj.weight [f, d]  (Mixtral: w1, w3)
  down       [E, f, d] <- mlp.experts.{j}.down_proj.weight [d, f]            (Mixtral: w2)
  shared_gate_proj, shared_up, shared_down <- mlp.shared_expert.*_proj.weight (Qwen2-MoE)
  shared_gate [d, 1]   <- mlp.shared_expert_gate.weight [1, d]
RoPE needs no permutation: lmjax rotates the two halves of each head, as HF's
`rotate_half` does.

Export writes the source model's config.json back key for key (max_position_embeddings,
token ids, RoPE parameters, sliding_window and every other key), except the fields in
EXPORT_CHANGED_FIELDS: the dtype keys, set to the dtype of the written files (the
source's, unless `dtype` asks for another). Its generation_config.json is copied as it
was (or, if it had none, built from config.json's token ids). The model config must
still describe the source's network: a config that no longer matches (e.g. a resized
vocabulary) is an error. `import_hf` records both files in the checkpoint meta, and every
run started from it (init_from, LoRA, merged checkpoints) carries them on, so
`weights.export_workdir` finds them however many runs later. A model trained from scratch gets a
config.json made from cfg.model (max_position_embeddings = data.seq_len, its tokenizer's
token ids) and a generation_config.json with those ids.

Import reads, for each device, only the block of each tensor that device holds
(safetensors `get_slice`, memory-mapped; stacked parameters layer by layer), so the model
is never held whole in host memory. Export writes one tensor (one layer of a stacked
parameter) at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import itertools
import json
import math
import os
import shutil
import struct
import warnings

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import sharding
from lmjax.errors import ExistsError, UserError
from lmjax.models import transformer
from lmjax.train import state as state_lib

ARCHS = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
         'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
         'mixtral': 'MixtralForCausalLM', 'qwen2_moe': 'Qwen2MoeForCausalLM',
         'qwen3_moe': 'Qwen3MoeForCausalLM'}
# Reward models (model.head='score'): the same body with `score.weight` [1, d] for
# num_labels=1 instead of lm_head, read at the last token that is not padding.
SCORE_ARCHS = {k: v.replace('ForCausalLM', 'ForSequenceClassification')
               for k, v in ARCHS.items()}
# What each architecture's network has, beside the Llama body: q/k/v biases, QK-norm, a
# mixture of experts (and a gated shared expert).
QKV_BIAS_ARCHS = ('qwen2', 'qwen2_moe')
QK_NORM_ARCHS = ('qwen3', 'qwen3_moe')
MOE_ARCHS = ('mixtral', 'qwen2_moe', 'qwen3_moe')
TOKENIZER_FILE = 'tokenizer.model'
TOKENIZER_DIR = 'tokenizer'  # an imported workdir's copy of the model's tokenizer files
GENERATION_FILE = 'generation_config.json'
TOKEN_ID_KEYS = ('bos_token_id', 'eos_token_id', 'pad_token_id')
# The only config.json keys export changes in a source model's config: the dtype of the
# files ('dtype' in transformers >= 5, 'torch_dtype' before; 'dtype' is added when the
# source has neither). Every other key is written back as the source had it.
EXPORT_CHANGED_FIELDS = ('dtype', 'torch_dtype')
# Dtypes export writes (float16: as e.g. Llama 2 ships; lmjax computes in the first two).
FILE_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
DEFAULT_SHARD_BYTES = 4 * 2**30
# Tensors some checkpoints carry that the model does not use.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)
_ST_DTYPES = {np.dtype(np.float32): 'F32', np.dtype(ml_dtypes.bfloat16): 'BF16',
              np.dtype(np.float16): 'F16'}


class HFError(UserError, ValueError):
  """A Hugging Face config or checkpoint lmjax cannot read; the message names the field,
  tensor or file."""


# ---- Configs --------------------------------------------------------------------------

def _read_json(path: str) -> dict:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise HFError(f'{path} is not valid JSON ({e}); restore the file') from None


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.exists(path):
    raise HFError(f'{hf_dir}: no config.json (not a Hugging Face model directory)')
  return _read_json(path)


def read_generation_config(hf_dir: str) -> dict | None:
  """generation_config.json of an HF model dir, None if it has none."""
  path = os.path.join(hf_dir, GENERATION_FILE)
  return _read_json(path) if os.path.exists(path) else None


def hf_arch(hf_config: dict) -> str:
  """An ARCHS key from config.json's model_type (and architectures)."""
  model_type = hf_config.get('model_type')
  if model_type not in ARCHS:
    raise HFError(f'config.json model_type={model_type!r} is not supported '
                  f'(supported: {", ".join(ARCHS)})')
  archs = hf_config.get('architectures') or [ARCHS[model_type]]
  if archs not in ([ARCHS[model_type]], [SCORE_ARCHS[model_type]]):
    raise HFError(f'config.json architectures={archs}: only [{ARCHS[model_type]!r}] (a '
                  f'causal LM head) or [{SCORE_ARCHS[model_type]!r}] (a reward model) is '
                  f'supported for model_type={model_type!r}')
  return model_type


def hf_head(hf_config: dict) -> str:
  """cfg.model.head of config.json: 'score' for a *ForSequenceClassification reward model
  (one label), else 'lm'."""
  arch = hf_arch(hf_config)
  if (hf_config.get('architectures') or [None])[0] != SCORE_ARCHS[arch]:
    return 'lm'
  labels = hf_config.get('num_labels') or len(hf_config.get('id2label') or {0: ''})
  if labels != 1:
    raise HFError(f'config.json num_labels={labels}: only a single score (num_labels=1, a '
                  'reward model) is supported')
  return 'score'


def _rope(c: dict) -> tuple[float, dict]:
  """(rope_theta, lmjax rope_scaling) from `rope_parameters` (transformers >= 5) or
  `rope_theta` + `rope_scaling` (earlier versions)."""
  key = 'rope_parameters' if c.get('rope_parameters') is not None else 'rope_scaling'
  params = dict(c.get(key) or {})
  if any(isinstance(v, dict) for v in params.values()):
    raise HFError(f'config.json {key}: per-layer-type RoPE parameters are not supported')
  theta = float(params.get('rope_theta', c.get('rope_theta', 10000.0)))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind == 'default':
    return theta, {'type': 'none'}
  if kind == 'llama3':
    try:
      return theta, {'type': 'llama3', 'factor': float(params['factor']),
                     'low_freq_factor': float(params['low_freq_factor']),
                     'high_freq_factor': float(params['high_freq_factor']),
                     'original_max_len': int(params['original_max_position_embeddings'])}
    except KeyError as e:
      raise HFError(f'config.json {key}: rope_type llama3 needs {e.args[0]!r}') from None
  raise HFError(f'config.json {key}.rope_type={kind!r} is not supported '
                "(supported: 'default', 'llama3')")


def attention_window(hf_config: dict) -> int | None:
  """The sliding attention window config.json gives the model (Mistral's sliding_window;
  Qwen2's when use_sliding_window), or None."""
  window = hf_config.get('sliding_window')
  if not window or ('use_sliding_window' in hf_config
                    and not hf_config.get('use_sliding_window')):
    return None
  return int(window)


def model_overrides_from_hf(hf_config: dict, seq_len: int | None = None) -> dict:
  """config.json -> {cfg.model field: value}. Raises HFError, naming the config.json field,
  for what the lmjax model cannot represent. With `seq_len` (the length trained or
  evaluated on), a sliding attention window shorter than it is an error too."""
  c = hf_config
  arch = hf_arch(c)
  for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads'):
    if not isinstance(c.get(key), int):
      raise HFError(f'config.json {key}={c.get(key)!r}: expected an integer')
  if c.get('hidden_act', 'silu') != 'silu':
    raise HFError(f'config.json hidden_act={c["hidden_act"]!r}: only silu (SwiGLU) is supported')
  if arch not in QKV_BIAS_ARCHS and c.get('attention_bias'):
    raise HFError('config.json attention_bias=true: attention biases are not supported for '
                  f'{arch} (only q/k/v biases, as Qwen2 has)')
  if arch == 'qwen2_moe' and c.get('qkv_bias') is False:
    raise HFError('config.json qkv_bias=false: Qwen2-MoE without q/k/v biases is not supported')
  if c.get('mlp_bias'):
    raise HFError('config.json mlp_bias=true: MLP biases are not supported')
  if c.get('quantization_config'):
    raise HFError('config.json quantization_config: quantized checkpoints are not supported')
  if c.get('partial_rotary_factor', 1.0) != 1.0:
    raise HFError(f'config.json partial_rotary_factor={c["partial_rotary_factor"]}: '
                  'only full-width RoPE is supported')
  window = attention_window(c)
  if window is not None:
    if seq_len is not None and window < seq_len:
      raise HFError(f'config.json sliding_window={window} is shorter than data.seq_len='
                    f'{seq_len}: lmjax attends to the whole causal context (no sliding '
                    f'window), so it matches this model only for sequences <= {window} '
                    f'(set data.seq_len, or lmjax.load(..., seq_len=N), to at most {window})')
  theta, scaling = _rope(c)
  n_heads = c['num_attention_heads']
  head_dim = c.get('head_dim') or c['hidden_size'] // n_heads
  return dict(
      vocab_size=c['vocab_size'], d_model=c['hidden_size'], n_layers=c['num_hidden_layers'],
      n_heads=n_heads, n_kv_heads=c.get('num_key_value_heads') or n_heads,
      # 0: lmjax's default, d_model // n_heads.
      head_dim=0 if head_dim * n_heads == c['hidden_size'] else head_dim,
      d_ff=c['intermediate_size'], norm_eps=float(c.get('rms_norm_eps', 1e-6)),
      rope_theta=theta, rope_scaling=scaling,
      tie_embeddings=bool(c.get('tie_word_embeddings', False)),
      qkv_bias=arch in QKV_BIAS_ARCHS, qk_norm=arch in QK_NORM_ARCHS, moe=_moe_from_hf(c),
      attn_logit_softcap=0.0, final_logit_softcap=0.0, head=hf_head(c))


def _moe_from_hf(c: dict) -> dict:
  """cfg.model.moe's fields that shape the network, from config.json ({'experts': 0} for a
  dense model)."""
  arch = c['model_type']
  if arch not in MOE_ARCHS:
    return {'experts': 0}
  experts = c.get('num_local_experts') or c.get('num_experts')
  for key, value in (('num_experts', experts),
                     ('num_experts_per_tok', c.get('num_experts_per_tok'))):
    if not isinstance(value, int) or value <= 0:
      raise HFError(f'config.json {key}={value!r}: expected a positive integer')
  if arch != 'mixtral':
    if c.get('mlp_only_layers') or c.get('decoder_sparse_step', 1) != 1:
      raise HFError(f'config.json mlp_only_layers={c.get("mlp_only_layers")} / '
                    f'decoder_sparse_step={c.get("decoder_sparse_step")}: only models whose '
                    'every layer is a mixture of experts are supported')
    if not isinstance(c.get('moe_intermediate_size'), int):
      raise HFError(f'config.json moe_intermediate_size={c.get("moe_intermediate_size")!r}: '
                    'expected an integer')
  shared = int(c.get('shared_expert_intermediate_size') or 0) if arch == 'qwen2_moe' else 0
  return {'experts': experts, 'top_k': c['num_experts_per_tok'],
          # Mixtral's experts are intermediate_size wide: model.d_ff (moe.d_ff 0).
          'd_ff': 0 if arch == 'mixtral' else c['moe_intermediate_size'],
          'renormalize': True if arch == 'mixtral' else bool(c.get('norm_topk_prob', False)),
          'shared_d_ff': shared, 'shared_gate': True}


def default_arch(mcfg) -> str:
  """The HF architecture a model trained from scratch exports as: the one whose network it
  is (QK-norm: Qwen3 / Qwen3-MoE; a shared expert: Qwen2-MoE; q/k/v biases: Qwen2; other
  MoE: Mixtral; else Llama)."""
  moe = transformer.is_moe(mcfg)
  if mcfg.get('qk_norm'):
    return 'qwen3_moe' if moe else 'qwen3'
  if moe:
    return 'qwen2_moe' if int(mcfg.moe.shared_d_ff) else 'mixtral'
  return 'qwen2' if mcfg.qkv_bias else 'llama'


def _check_arch(mcfg, arch: str) -> None:
  """HFError unless `arch`'s network is cfg.model's (biases, QK-norm, experts)."""
  if arch not in ARCHS:
    raise HFError(f'arch={arch!r} is not supported (supported: {", ".join(ARCHS)})')
  moe = transformer.is_moe(mcfg)
  parts = (  # (what, the model has it, the arch has it)
      ('q/k/v biases (model.qkv_bias)', bool(mcfg.qkv_bias), arch in QKV_BIAS_ARCHS),
      ('QK-norm (model.qk_norm)', bool(mcfg.get('qk_norm')), arch in QK_NORM_ARCHS),
      ('a mixture of experts (model.moe.experts > 0)', moe, arch in MOE_ARCHS),
      ('a shared expert (model.moe.shared_d_ff > 0)', moe and int(mcfg.moe.shared_d_ff) > 0,
       arch == 'qwen2_moe'))
  for what, have, want in parts:
    if have != want:
      raise HFError(f'arch={arch!r} {"needs" if want else "cannot hold"} {what}, which '
                    f'the model {"lacks" if want else "has"}; export as '
                    f'{default_arch(mcfg)!r}')
  for key in ('attn_logit_softcap', 'final_logit_softcap'):
    if mcfg.get(key):
      raise HFError(f'model.{key}={mcfg[key]}: none of the exported architectures '
                    f'({", ".join(ARCHS)}) soft-caps its logits')
  if arch == 'mixtral' and not mcfg.moe.renormalize:
    raise HFError("arch='mixtral' renormalises the top-k weights but model.moe.renormalize="
                  "False; export as 'qwen3_moe' (norm_topk_prob) or set it")
  if arch == 'qwen2_moe' and not mcfg.moe.shared_gate:
    raise HFError("arch='qwen2_moe' gates its shared expert but model.moe.shared_gate=False")


def hf_config_from_model(mcfg, arch: str | None = None,
                         max_position_embeddings: int | None = None,
                         dtype: str | None = None, **extra) -> dict:
  """cfg.model -> config.json for `arch` (default `default_arch`), readable by
  transformers 5 (`rope_parameters`) and earlier versions (`rope_theta`, `rope_scaling`).
  `extra` adds or replaces keys (e.g. bos_token_id)."""
  arch = arch or default_arch(mcfg)
  _check_arch(mcfg, arch)
  rope = {'rope_type': 'default', 'rope_theta': float(mcfg.rope_theta)}
  rs = mcfg.rope_scaling
  if rs.get('type', 'none') == 'llama3':
    rope.update(rope_type='llama3', factor=float(rs['factor']),
                low_freq_factor=float(rs['low_freq_factor']),
                high_freq_factor=float(rs['high_freq_factor']),
                original_max_position_embeddings=int(rs['original_max_len']))
    max_position_embeddings = max(max_position_embeddings or 0,
                                  int(rs['original_max_len'] * rs['factor']))
  legacy_scaling = None
  if rope['rope_type'] != 'default':
    legacy_scaling = {k: v for k, v in rope.items() if k != 'rope_theta'}
  score = transformer.head_kind(mcfg) == 'score'
  c = dict(
      architectures=[(SCORE_ARCHS if score else ARCHS)[arch]], model_type=arch,
      vocab_size=mcfg.vocab_size,
      hidden_size=mcfg.d_model, intermediate_size=mcfg.d_ff,
      num_hidden_layers=mcfg.n_layers, num_attention_heads=mcfg.n_heads,
      num_key_value_heads=mcfg.n_kv_heads, head_dim=transformer.head_dim(mcfg),
      hidden_act='silu', max_position_embeddings=max_position_embeddings or 4096,
      rms_norm_eps=float(mcfg.norm_eps), rope_parameters=rope,
      rope_theta=rope['rope_theta'], rope_scaling=legacy_scaling,
      tie_word_embeddings=bool(mcfg.tie_embeddings), initializer_range=float(mcfg.init_std),
      attention_dropout=0.0, use_cache=True, dtype=dtype or mcfg.param_dtype)
  if arch == 'llama':
    c.update(attention_bias=False, mlp_bias=False)
  elif arch in ('mistral', 'mixtral'):
    c.update(sliding_window=None)
  else:
    c.update(use_sliding_window=False, sliding_window=None)
  if arch in ('qwen3', 'qwen3_moe'):
    c.update(attention_bias=False)
  if arch in MOE_ARCHS:
    m = mcfg.moe
    f = int(m.d_ff) or mcfg.d_ff
    c.update(num_experts_per_tok=int(m.top_k), router_aux_loss_coef=float(m.aux_loss),
             output_router_logits=False)
    if arch == 'mixtral':
      c.update(num_local_experts=int(m.experts), intermediate_size=f, router_jitter_noise=0.0)
    else:
      c.update(num_experts=int(m.experts), moe_intermediate_size=f,
               norm_topk_prob=bool(m.renormalize), decoder_sparse_step=1, mlp_only_layers=[])
    if arch == 'qwen2_moe':
      c.update(shared_expert_intermediate_size=int(m.shared_d_ff), qkv_bias=True)
  if score:  # how transformers writes num_labels=1
    c.update(id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0})
  c.update(extra)
  return c


def score_config(hf_config: dict) -> dict:
  """A *ForCausalLM config.json as its *ForSequenceClassification (num_labels=1) reward
  model's: the architecture and the single label, every other key as it was."""
  c = copy.deepcopy(hf_config)
  c.update(architectures=[SCORE_ARCHS[hf_arch(hf_config)]], id2label={'0': 'LABEL_0'},
           label2id={'LABEL_0': 0})
  c.pop('num_labels', None)
  return c


def _flatten(d: dict, prefix: str) -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def config_from_hf(hf_dir: str, base_cfg=None):
  """An lmjax config for the model in `hf_dir`: `base_cfg` (default `base_config()`) with
  the model fields from config.json, and the tokenizer set to `hf_dir` when it holds one
  (tokenizer.json or tokenizer.model, with its tokenizer_config.json and chat template).
  Without one, tokenizer.train_if_missing is turned off (a tokenizer trained anew would
  not match the pretrained embeddings), unless tokenizer.path is set."""
  from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.base_config() if base_cfg is None else copy.deepcopy(base_cfg)
  hf_config = read_hf_config(hf_dir)
  model = model_overrides_from_hf(hf_config, seq_len=cfg.data.seq_len)
  if model['moe']['experts'] and hf_config.get('router_aux_loss_coef') is not None:
    # The model's own load-balancing weight (its training setting, not its network).
    model['moe']['aux_loss'] = float(hf_config['router_aux_loss_coef'])
  config_lib.apply_overrides(cfg, _flatten(model, 'model.'))
  hf_dir = os.path.abspath(hf_dir)
  if tokenizer_lib.is_tokenizer_dir(hf_dir):
    tok = tokenizer_lib.from_path(hf_dir)
    tokenizer_lib.check_vocab(tok, cfg.model.vocab_size)
    cfg.tokenizer.update(path=hf_dir, vocab_size=tok.vocab_size, train_if_missing=False)
  else:
    cfg.tokenizer.vocab_size = min(cfg.tokenizer.vocab_size, cfg.model.vocab_size)
    if not cfg.tokenizer.path:
      cfg.tokenizer.train_if_missing = False
  config_lib.validate(cfg)
  cfg.lock()
  return cfg


# ---- Tensor names and layouts ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Spec:
  path: tuple[str, ...]   # key path in the lmjax params dict
  name: str               # HF tensor name; '{i}' stands for the layer index, '{j}' the expert's
  kind: str               # same | T | in_heads | out_heads | bias_heads

  @property
  def lead(self) -> int:
    """Leading dims of the lmjax param stacked over HF tensors: 0; 1 (layers); 2 (layers,
    experts)."""
    return ('{i}' in self.name) + ('{j}' in self.name)

  def names(self, shape) -> list[tuple[tuple[int, ...], str]]:
    """(index into the stacked dims, HF tensor name) of each tensor, in file order."""
    return [(idx, self.name.format(i=idx[0] if idx else None, j=idx[1] if len(idx) > 1 else None))
            for idx in itertools.product(*(range(n) for n in shape[:self.lead]))]


def _specs(mcfg, arch: str) -> list[_Spec]:
  """Every parameter of `mcfg`'s model, in HF file order, named as `arch` names them."""
  layer = 'model.layers.{i}.'
  specs = [_Spec(('embed',), 'model.embed_tokens.weight', 'same')]
  for x in 'qkv':
    specs.append(_Spec(('layers', 'attn', x), f'{layer}self_attn.{x}_proj.weight', 'in_heads'))
    if mcfg.qkv_bias:
      specs.append(_Spec(('layers', 'attn', f'{x}_bias'), f'{layer}self_attn.{x}_proj.bias',
                         'bias_heads'))
  specs.append(_Spec(('layers', 'attn', 'o'), f'{layer}self_attn.o_proj.weight', 'out_heads'))
  if mcfg.get('qk_norm'):
    specs += [_Spec(('layers', 'attn', f'{x}_norm', 'scale'), f'{layer}self_attn.{x}_norm.weight',
                    'same') for x in 'qk']
  if transformer.is_moe(mcfg):
    specs += _moe_specs(mcfg, layer, arch == 'mixtral')
  else:
    specs += [
        _Spec(('layers', 'mlp', 'gate'), f'{layer}mlp.gate_proj.weight', 'T'),
        _Spec(('layers', 'mlp', 'up'), f'{layer}mlp.up_proj.weight', 'T'),
        _Spec(('layers', 'mlp', 'down'), f'{layer}mlp.down_proj.weight', 'T')]
  specs += [
      _Spec(('layers', 'attn_norm', 'scale'), f'{layer}input_layernorm.weight', 'same'),
      _Spec(('layers', 'mlp_norm', 'scale'), f'{layer}post_attention_layernorm.weight', 'same'),
      _Spec(('final_norm', 'scale'), 'model.norm.weight', 'same'),
  ]
  if transformer.head_kind(mcfg) == 'score':
    specs.append(_Spec(('score',), 'score.weight', 'T'))
  elif not mcfg.tie_embeddings:
    specs.append(_Spec(('lm_head',), 'lm_head.weight', 'T'))
  return specs


def _moe_specs(mcfg, layer: str, mixtral: bool) -> list[_Spec]:
  """A mixture-of-experts layer's tensors (Mixtral's names, or Qwen-MoE's)."""
  block = f'{layer}block_sparse_moe.' if mixtral else f'{layer}mlp.'
  names = (('gate', 'w1'), ('up', 'w3'), ('down', 'w2')) if mixtral else \
      (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj'))
  specs = [_Spec(('layers', 'moe', 'router'), f'{block}gate.weight', 'T')]
  specs += [_Spec(('layers', 'moe', ours), block + 'experts.{j}.' + f'{theirs}.weight', 'T')
            for ours, theirs in names]
  if int(mcfg.moe.shared_d_ff):
    specs += [_Spec(('layers', 'moe', f'shared_{ours}' if ours != 'gate' else 'shared_gate_proj'),
                    f'{block}shared_expert.{ours}_proj.weight', 'T')
              for ours in ('gate', 'up', 'down')]
    if mcfg.moe.shared_gate:
      specs.append(_Spec(('layers', 'moe', 'shared_gate'), f'{block}shared_expert_gate.weight',
                         'T'))
  return specs


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """HF shape of one (per-layer) lmjax tensor of `shape`."""
  if kind == 'same':
    return tuple(shape)
  if kind == 'T':
    return tuple(shape[::-1])
  if kind == 'in_heads':
    d, n, h = shape
    return (n * h, d)
  if kind == 'out_heads':
    n, h, d = shape
    return (d, n * h)
  return (math.prod(shape),)  # bias_heads


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == 'same':
    return x
  if kind == 'T':
    return x.T
  if kind == 'in_heads':
    return x.reshape(x.shape[0], -1).T
  if kind == 'out_heads':
    return x.reshape(-1, x.shape[-1]).T
  return x.reshape(-1)


def _read_block(src, kind: str, bounds, shape) -> np.ndarray:
  """The block `bounds` ((start, stop) per dim) of an lmjax-layout tensor of `shape`,
  read from the HF tensor `src` (a safetensors slice) without reading the rest."""
  sl = tuple(slice(a, b) for a, b in bounds)
  if kind == 'same':
    return src[sl]
  if kind == 'T':
    return src[sl[::-1]].T
  if kind == 'in_heads':    # [d, n, h] <- [n*h, d]
    (d0, d1), (n0, n1), _ = bounds
    h = shape[2]
    x = src[n0 * h:n1 * h, d0:d1].reshape(n1 - n0, h, d1 - d0)
    return x[:, sl[2], :].transpose(2, 0, 1)
  if kind == 'out_heads':   # [n, h, d] <- [d, n*h]
    (n0, n1), _, (d0, d1) = bounds
    h = shape[1]
    x = src[d0:d1, n0 * h:n1 * h].reshape(d1 - d0, n1 - n0, h)
    return x[:, :, sl[1]].transpose(1, 2, 0)
  (n0, n1), _ = bounds      # bias_heads: [n, h] <- [n*h]
  h = shape[1]
  return src[n0 * h:n1 * h].reshape(n1 - n0, h)[:, sl[1]]


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ---- Import ---------------------------------------------------------------------------

def _safe_open(path: str):
  """safetensors' `safe_open` of `path` (memory-mapped; header read and checked against
  the file's size), with HFError naming the file if it is not a whole safetensors file."""
  try:
    return safe_open(path, framework='np')
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError)
    detail = str(e).strip().split('\n')[0][:200]
    raise HFError(f'{path} is not a readable safetensors file ({type(e).__name__}: {detail});'
                  ' it may be truncated or corrupt: download it again') from None


class _SafetensorsDir:
  """The tensors of an HF model directory: model.safetensors, or the shards listed in
  model.safetensors.index.json. Files are opened (memory-mapped) when first read."""

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    single, index = os.path.join(hf_dir, SINGLE_FILE), os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(single):  # what transformers prefers when both exist
      self.where = single
      with _safe_open(single) as f:
        self.files = {name: SINGLE_FILE for name in f.keys()}
    elif os.path.exists(index):
      self.where = index
      obj = _read_json(index)
      weight_map = obj.get('weight_map') if isinstance(obj, dict) else None
      if not isinstance(weight_map, dict):
        raise HFError(f'{index} has no "weight_map" (tensor name -> file): restore the file')
      self.files = dict(weight_map)
    else:
      raise HFError(f'{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors '
                    'checkpoints are read; convert .bin files with transformers first)')
    self._open, self._keys = {}, {}

  def slice(self, name: str, shape: tuple[int, ...]):
    """A lazily read view of tensor `name`, checked to have `shape`."""
    if name not in self.files:
      raise HFError(f'tensor {name!r} is missing from {self.where}')
    file = self.files[name]
    if file not in self._open:
      path = os.path.join(self.dir, file)
      if not os.path.exists(path):
        raise HFError(f'{self.where} lists {file} (for tensor {name!r}), which does not exist')
      self._open[file] = _safe_open(path)
      self._keys[file] = set(self._open[file].keys())
    if name not in self._keys[file]:  # the index names a file that lacks it
      raise HFError(f'tensor {name!r} is missing from {os.path.join(self.dir, file)} '
                    f'(where {self.where} puts it)')
    src = self._open[file].get_slice(name)
    if tuple(src.get_shape()) != tuple(shape):
      raise HFError(f'tensor {name!r} in {os.path.join(self.dir, file)} has shape '
                    f'{tuple(src.get_shape())}, expected {tuple(shape)} from config.json')
    return src

  def close(self):
    self._open.clear()


def _place(reader: _SafetensorsDir, spec: _Spec, shape, sharding_, dtype) -> jax.Array:
  """One parameter as a global jax.Array with `sharding_`: each distinct device block is
  read from the files, converted, and sent to its devices before the next is read."""
  lead = spec.lead
  inner_shape = shape[lead:]
  hf_shape = _hf_shape(spec.kind, inner_shape)
  blocks: dict[tuple, list] = {}
  for device, index in sharding_.addressable_devices_indices_map(shape).items():
    bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    blocks.setdefault(bounds, []).append(device)
  arrays = []
  for bounds, devices in blocks.items():
    if lead:  # stacked over layers (and experts): one HF tensor per index
      outer, rest = bounds[:lead], bounds[lead:]
      block = np.empty(tuple(b - a for a, b in bounds), dtype)
      for idx in itertools.product(*(range(a, b) for a, b in outer)):
        name = spec.name.format(i=idx[0], j=idx[1] if lead > 1 else None)
        src = reader.slice(name, hf_shape)
        block[tuple(x - a for x, (a, _) in zip(idx, outer))] = _read_block(
            src, spec.kind, rest, inner_shape)
    else:
      src = reader.slice(spec.name, hf_shape)
      block = np.asarray(_read_block(src, spec.kind, bounds, inner_shape)).astype(dtype)
    arrays += [jax.device_put(block, d) for d in devices]
    del block
  return jax.make_array_from_single_device_arrays(shape, sharding_, arrays)


def check_model_config(hf_config: dict, mcfg) -> None:
  """Raises HFError unless cfg.model describes the same network as config.json (every
  field model_overrides_from_hf sets; param_dtype and the like may differ)."""
  diff = _model_diff(hf_config, mcfg)
  if diff:
    raise HFError('the model config does not match config.json (' + '; '.join(diff)
                  + '); build the config with hf.config_from_hf')


def _model_diff(hf_config: dict, mcfg) -> list[str]:
  """'model.<field>: config <value> vs config.json <value>' for each field of cfg.model
  that differs from what config.json gives."""
  want = model_overrides_from_hf(hf_config)
  diff = []
  for key, value in want.items():
    have = transformer.head_kind(mcfg) if key == 'head' else mcfg[key]
    if key == 'head_dim':
      value = value or mcfg.d_model // mcfg.n_heads
      have = have or mcfg.d_model // mcfg.n_heads
    elif key in ('rope_scaling', 'moe'):
      have = {k: have.get(k) for k in value}
    if have != value:
      diff.append(f'model.{key}: config {have!r} vs config.json {value!r}')
  return diff


def _check_tensors(reader: _SafetensorsDir, mcfg, shapes, arch: str) -> None:
  """HFError unless the files hold every tensor of `mcfg`'s model with its shape (`shapes`:
  the params' abstract tree), and no other; reads the file headers only."""
  used = set()
  for spec in _specs(mcfg, arch):
    shape = _get(shapes, spec.path).shape
    for _, name in spec.names(shape):
      reader.slice(name, _hf_shape(spec.kind, shape[spec.lead:]))
      used.add(name)
  if mcfg.tie_embeddings and transformer.head_kind(mcfg) == 'lm':
    used.add('lm_head.weight')  # some tied checkpoints store the copy too
  unused = sorted(n for n in reader.files if n not in used and not n.endswith(_IGNORED_SUFFIXES))
  if unused:
    raise HFError(f'{reader.where} holds tensors this config does not use: '
                  f'{", ".join(unused[:5])}{" ..." if len(unused) > 5 else ""} '
                  '(biases or a head the lmjax model lacks?)')


def check_files(hf_dir: str, cfg) -> None:
  """HFError, naming the file, unless `hf_dir`'s safetensors files are readable and hold
  exactly the tensors of cfg.model with their shapes (headers only: no tensor is read)."""
  hf_config = read_hf_config(hf_dir)
  check_model_config(hf_config, cfg.model)
  _, _, shapes = state_lib.logical_param_specs(cfg)
  reader = _SafetensorsDir(hf_dir)
  try:
    _check_tensors(reader, cfg.model, shapes, hf_arch(hf_config))
  finally:
    reader.close()


def load_params(hf_dir: str, cfg, mesh=None, rules=None) -> dict:
  """The HF checkpoint in `hf_dir` as an lmjax params dict (`nnx.to_pure_dict` layout,
  layers stacked), each leaf placed with its NamedSharding on `mesh` (default: the mesh
  of cfg.mesh) under `rules` (default cfg.rules), cast to cfg.model.param_dtype.

  cfg.model must match config.json (see `config_from_hf`); every tensor's presence and
  shape is checked (file headers only) before any is read.
  """
  mcfg = cfg.model
  hf_config = read_hf_config(hf_dir)
  check_model_config(hf_config, mcfg)
  arch = hf_arch(hf_config)
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  rules = dict(cfg.rules if rules is None else rules)
  _, specs, shapes = state_lib.logical_param_specs(cfg)
  shardings = sharding.tree_shardings(specs, shapes, mesh, rules)
  dtype = np.dtype(transformer.DTYPES[mcfg.param_dtype])
  table = _specs(mcfg, arch)
  reader = _SafetensorsDir(hf_dir)
  try:
    _check_tensors(reader, mcfg, shapes, arch)
    params: dict = {}
    for spec in table:
      leaf = _get(shapes, spec.path)
      _set(params, spec.path, _place(reader, spec, leaf.shape, _get(shardings, spec.path), dtype))
  finally:
    reader.close()
  return params


# ---- Export ---------------------------------------------------------------------------

def _fetch(x: jax.Array, index: tuple[int, ...]) -> np.ndarray:
  """One leaf (or one layer / expert of a stacked leaf: `index` into its leading dims) on
  the host."""
  if index:
    x = x[index]
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _write_safetensors(path: str, entries: list, metadata: dict) -> None:
  """Writes a safetensors file from entries (name, shape, dtype, fetch) one tensor at a
  time: the header (shapes and offsets) first, then each tensor's bytes as `fetch()`
  returns them. (safetensors' own writers need every tensor of a file in memory.)"""
  header, offset = {}, 0
  for name, shape, dtype, _ in entries:
    n = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': _ST_DTYPES[dtype], 'shape': list(shape),
                    'data_offsets': [offset, offset + n]}
    offset += n
  header['__metadata__'] = metadata
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for name, shape, dtype, fetch in entries:
      x = np.ascontiguousarray(fetch(), dtype=dtype)
      assert x.shape == tuple(shape), (name, x.shape, shape)
      f.write(x.reshape(-1).view(np.uint8).data)
  os.replace(tmp, path)


def _model_files(out_dir: str) -> list[str]:
  names = glob.glob(os.path.join(out_dir, 'model-*-of-*.safetensors'))
  return names + [p for p in (os.path.join(out_dir, SINGLE_FILE),
                              os.path.join(out_dir, INDEX_FILE)) if os.path.exists(p)]


def save_hf(params: dict, cfg, out_dir: str, arch: str | None = None,
            tokenizer_path: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            dtype: str | None = None, overwrite: bool = False, hf_config: dict | None = None,
            generation_config: dict | None = None) -> list[str]:
  """Writes `params` (an lmjax params dict, sharded or not) as a Hugging Face model dir:
  config.json, generation_config.json, model.safetensors (or shards of at most
  `max_shard_bytes` plus model.safetensors.index.json) and, with `tokenizer_path` (a
  .model, a tokenizer.json or a tokenizer directory), the tokenizer's files.

  hf_config: the source model's config.json (a model imported from HF), written back
    unchanged but for EXPORT_CHANGED_FIELDS; cfg.model must still match it. None: one is
    made from cfg.model, with the bos/eos/pad ids of `tokenizer_path`'s tokenizer.
  generation_config: the source model's generation_config.json, written as is; None: one
    with config.json's token ids.
  arch: an ARCHS key; default the source's, else `default_arch` (the one whose network
    cfg.model is).
  dtype: 'float32' | 'bfloat16' | 'float16' for the files (default the source config's
    dtype, else cfg.model.param_dtype).
  Existing model files in `out_dir` are an error unless `overwrite`, which removes them.
  Every process must call this (multi-host gathers); process 0 writes. Returns the paths.
  """
  mcfg = cfg.model
  if (hf_config is not None and transformer.head_kind(mcfg) == 'score'
      and hf_head(hf_config) == 'lm'):
    hf_config = score_config(hf_config)  # a reward model trained from a causal LM
  if hf_config is not None:
    source_arch = hf_arch(hf_config)
    if arch and arch != source_arch:
      raise HFError(f'arch={arch!r} differs from the source config.json model_type='
                    f'{source_arch!r}; drop arch (--arch) to keep the source\'s, or export '
                    'without the source config (hf_config=None; convert_hf.py export --new_config)')
    arch = source_arch
    diff = _model_diff(hf_config, mcfg)
    if diff:
      raise HFError('the model config no longer matches the source config.json ('
                    + '; '.join(diff) + '); export with a config.json made from the model '
                    'config instead (hf_config=None; convert_hf.py export --new_config)')
  arch = arch or default_arch(mcfg)
  source_dtype = _config_dtype(hf_config or {})
  dtype = dtype or (source_dtype if source_dtype in FILE_DTYPES else mcfg.param_dtype)
  if dtype not in FILE_DTYPES:
    raise HFError(f'dtype={dtype!r}: expected one of {tuple(FILE_DTYPES)}')
  np_dtype = np.dtype(FILE_DTYPES[dtype])
  extra = {}
  if tokenizer_path:
    from lmjax.data import tokenizer as tokenizer_lib
    tok = tokenizer_lib.from_path(tokenizer_path)
    tokenizer_lib.check_vocab(tok, mcfg.vocab_size)
    pad = tok.pad_id if 'pad_token' in tok.special_tokens else None
    extra = {k: v for k, v in (('bos_token_id', tok.bos_id), ('eos_token_id', tok.eos_id),
                               ('pad_token_id', pad)) if v is not None and v >= 0}
  if hf_config is None:
    max_pos = cfg.data.seq_len if 'data' in cfg else None
    hf_cfg = hf_config_from_model(mcfg, arch, max_position_embeddings=max_pos, dtype=dtype,
                                  **extra)
  else:
    hf_cfg = copy.deepcopy(hf_config)
    dtype_keys = [k for k in EXPORT_CHANGED_FIELDS if k in hf_cfg] or ['dtype']
    hf_cfg.update((k, dtype) for k in dtype_keys)
    clash = [f'{k} {hf_cfg.get(k)!r} vs {v!r}' for k, v in extra.items()
             if hf_cfg.get(k) != v and (k != 'pad_token_id' or hf_cfg.get(k) is not None)]
    if clash:
      warnings.warn(f'the source config.json and the tokenizer {tokenizer_path} disagree on '
                    f'token ids ({", ".join(clash)}); config.json keeps the source\'s',
                    stacklevel=2)
  if transformer.head_kind(mcfg) == 'score' and hf_cfg.get('pad_token_id') is None:
    warnings.warn('exporting a reward model without pad_token_id (its tokenizer defines no '
                  'pad token): transformers scores one sequence at a time until config.json '
                  'sets one', stacklevel=2)
  if generation_config is None:
    generation_config = {k: hf_cfg[k] for k in TOKEN_ID_KEYS if hf_cfg.get(k) is not None}

  _, _, shapes = state_lib.logical_param_specs(cfg)
  entries = []
  for spec in _specs(mcfg, arch):
    try:
      x = _get(params, spec.path)
    except (KeyError, TypeError):
      raise HFError(f'params have no {"/".join(spec.path)} (model config: '
                    f'qkv_bias={mcfg.qkv_bias}, tie_embeddings={mcfg.tie_embeddings})') from None
    want = _get(shapes, spec.path).shape
    if tuple(x.shape) != tuple(want):
      raise HFError(f'params {"/".join(spec.path)} has shape {tuple(x.shape)}, the config '
                    f'gives {tuple(want)}')
    hf_shape = _hf_shape(spec.kind, want[spec.lead:])
    for idx, name in spec.names(want):
      fetch = lambda x=x, idx=idx, kind=spec.kind: _to_hf(kind, _fetch(x, idx))
      entries.append((name, hf_shape, np_dtype, fetch))

  # Group into shards, in order, of at most max_shard_bytes (a larger tensor: alone).
  shards, size = [[]], 0
  for e in entries:
    n = math.prod(e[1]) * np_dtype.itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    stale = _model_files(out_dir)
    if stale and not overwrite:
      raise ExistsError(f'{out_dir} already holds model files ({os.path.basename(stale[0])}'
                        ', ...); pass overwrite=True (--overwrite) to replace them')
    for p in stale:
      os.remove(p)
  written = []
  for name, shard in zip(names, shards):
    path = os.path.join(out_dir, name)
    if writer:
      _write_safetensors(path, shard, {'format': 'pt'})
    else:
      for *_, fetch in shard:  # take part in the gathers
        fetch()
    written.append(path)
  if writer:
    if len(shards) > 1:
      total = sum(math.prod(e[1]) for e in entries) * np_dtype.itemsize
      index = {'metadata': {'total_size': total},
               'weight_map': {e[0]: n for n, shard in zip(names, shards) for e in shard}}
      written.append(_write_json(os.path.join(out_dir, INDEX_FILE), index))
    written.append(_write_json(os.path.join(out_dir, 'config.json'), hf_cfg))
    written.append(_write_json(os.path.join(out_dir, GENERATION_FILE), generation_config))
    if tokenizer_path:
      written += copy_tokenizer(tok, out_dir)
  return written


def copy_tokenizer(tok, out_dir: str, generation_config: bool = False) -> list[str]:
  """Copies the files that define `tok` (tokenizer.json / tokenizer.model and the
  tokenizer_config.json, special-token map and chat template beside it; with
  `generation_config`, its directory's generation_config.json too) into `out_dir`, under
  their Hugging Face names (a lone sentencepiece model becomes tokenizer.model)."""
  from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  files = list(tok.files())
  if generation_config and tok.config_dir:
    gen = os.path.join(tok.config_dir, tokenizer_lib.GENERATION_CONFIG)
    files += [gen] if os.path.exists(gen) else []
  written = []
  for src in files:
    name = os.path.basename(src)
    if src == tok.path and tok.kind == 'sentencepiece':
      name = TOKENIZER_FILE
    dst = os.path.join(out_dir, name)
    if os.path.abspath(src) != os.path.abspath(dst):
      shutil.copyfile(src, dst)
    written.append(dst)
  return written


def _config_dtype(hf_config: dict) -> str | None:
  """The dtype config.json declares ('dtype', or 'torch_dtype' before transformers 5)."""
  value = hf_config.get('dtype') or hf_config.get('torch_dtype')
  return value if isinstance(value, str) else None


def _write_json(path: str, obj) -> str:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  return path


# ---- Checkpoints (workdirs) -----------------------------------------------------------

def import_hf(hf_dir: str, workdir: str, base_cfg=None, mesh=None):
  """HF model dir -> step-0 lmjax checkpoint in `workdir`: train state with fresh
  optimizer state, the config, and meta recording the source, its config.json and
  generation_config.json (written back on export) and its tokenizer (its files copied to
  `<workdir>/tokenizer/` when the model ships one), so that
  `python -m lmjax.train --workdir=...` continues from it. Returns the config.

  The inputs (config.json, tokenizer, every safetensors header) are checked before anything
  is written; an import that fails removes what it created (the workdir, or its
  checkpoints/ and tokenizer/ directories)."""
  hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
  cfg = config_from_hf(hf_dir, base_cfg)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(ckpt_dir):
    existing = ckpt_lib.Checkpointer(workdir, None, read_only=True)
    latest = existing.latest_step()
    existing.close()
    if latest is not None:
      raise HFError(f'{workdir} already holds checkpoints (latest step {latest}); import into '
                    'a new workdir')
  check_files(hf_dir, cfg)
  created = [p for p in (workdir, ckpt_dir, os.path.join(workdir, TOKENIZER_DIR))
             if not os.path.exists(p)]
  try:
    _write_import(hf_dir, workdir, cfg, mesh)
  except BaseException:
    if jax.process_index() == 0:
      for path in created:
        shutil.rmtree(path, ignore_errors=True)
    raise
  return cfg


def _write_import(hf_dir: str, workdir: str, cfg, mesh) -> None:
  """import_hf's writes: the tokenizer copy and the step-0 checkpoint."""
  from lmjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  ckpt = ckpt_lib.Checkpointer(workdir, cfg)
  try:
    tok = ''
    if cfg.tokenizer.path == hf_dir:  # the model's tokenizer: a self-contained copy
      tok = os.path.join(workdir, TOKENIZER_DIR)
      if jax.process_index() == 0:
        copy_tokenizer(tokenizer_lib.from_path(hf_dir), tok, generation_config=True)
      cfg.tokenizer.path = tok
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    setup = state_lib.make_setup(cfg, mesh)
    params = load_params(hf_dir, cfg, mesh, setup.rules)
    with sharding.use_mesh(mesh, setup.rules):
      opt_state = jax.jit(setup.tx.init,
                          out_shardings=setup.state_shardings['opt_state'])(params)
    step = jax.device_put(np.zeros((), np.int32), setup.state_shardings['step'])
    meta = {'init_from': {'path': hf_dir, 'format': 'hf', 'step': None}, 'tokenizer': tok,
            'hf_config': read_hf_config(hf_dir),
            'hf_generation_config': read_generation_config(hf_dir)}
    ckpt.save(0, {'step': step, 'params': params, 'opt_state': opt_state}, cfg, force=True,
              meta=meta)
    ckpt.wait()
  finally:
    ckpt.close()
