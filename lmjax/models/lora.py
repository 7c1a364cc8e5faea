"""LoRA adapters for the Llama-family transformer, and their PEFT import/export.

    adapters = lora.init_adapters(key, cfg, mesh)         # float32, sharded like the base
    logits = model(tokens, adapters=adapters, lora=cfg.lora, dropout_rng=key)
    params = lora.merge(params, adapters, cfg)            # W + s·A@B, for export/serving
    lora.save_peft_adapter(adapters, cfg, out_dir)        # PeftModel.from_pretrained(...)
    adapters, lc = lora.load_peft_adapter(peft_dir, cfg)  # lc: the adapter's own settings
    params = lora.merge(params, adapters, lc)             # (or lmjax.load(base, adapter=...))

Adapters are a pure dict mirroring the param paths, stacked on the leading 'layers' axis
like the base: adapters['layers']['attn']['q'] = {'a': [L, d, r], 'b': [L, r, n, h]}.
cfg.lora.train_params (PEFT's modules_to_save) names base params trained fully with the
adapters: float32 copies under adapters['full'] (e.g. {'embed': [V, d]}), initialised
from the base and used in its place (`effective_params`); merging substitutes them.
A contracts the projection's input dims, B produces its output dims, in lmjax's layouts:

  target        base W       A             B             PEFT module
  q, k, v       [d, n, h]    [d, r]        [r, n, h]     self_attn.{q,k,v}_proj
  o             [n, h, d]    [n, h, r]     [r, d]        self_attn.o_proj
  gate, up      [d, f]       [d, r]        [r, f]        mlp.{gate,up}_proj
  down          [f, d]       [f, r]        [r, d]        mlp.down_proj

PEFT stores lora_A.weight [r, in] and lora_B.weight [out, r] (in/out flattened as
hf.py flattens the heads). A is initialised as PEFT does (kaiming-uniform, a=sqrt(5):
U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B at zero, so a fresh adapter leaves the model
unchanged. The scale is alpha/r, or alpha/sqrt(r) with rsLoRA.

A PEFT adapter brings its own LoRA config: rank, alpha, rsLoRA and targets are read from
its adapter_config.json (cfg.lora's values are defaults, not requirements; fields passed
as `lora=` must agree), and PEFT features lmjax does not compute (DoRA, biases,
modules_to_save, per-module ranks, some layers only, ...) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmjax import sharding
from lmjax.errors import NotFoundError, UserError
from lmjax.models import transformer

# name: (param path, number of input dims of the base weight, PEFT module name)
TARGETS = {
    'q': (('layers', 'attn', 'q'), 1, 'self_attn.q_proj'),
    'k': (('layers', 'attn', 'k'), 1, 'self_attn.k_proj'),
    'v': (('layers', 'attn', 'v'), 1, 'self_attn.v_proj'),
    'o': (('layers', 'attn', 'o'), 2, 'self_attn.o_proj'),
    'gate': (('layers', 'mlp', 'gate'), 1, 'mlp.gate_proj'),
    'up': (('layers', 'mlp', 'up'), 1, 'mlp.up_proj'),
    'down': (('layers', 'mlp', 'down'), 1, 'mlp.down_proj'),
}
_PEFT_NAMES = {v[2].split('.')[-1]: k for k, v in TARGETS.items()}   # 'q_proj' -> 'q'
_PEFT_PREFIX = 'base_model.model.model.layers.{i}.'
ADAPTER_FILE = 'adapter_model.safetensors'
ADAPTER_CONFIG = 'adapter_config.json'


class LoraError(UserError, ValueError):
  """A LoRA config or adapter file lmjax cannot use; the message names the field."""


def _lora(cfg):
  return cfg['lora'] if 'lora' in cfg else cfg


def _mcfg(cfg):
  m = cfg['model'] if 'model' in cfg else cfg
  return m if isinstance(m, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(m)


def targets(cfg) -> list[str]:
  """The target names cfg.lora.targets selects for cfg.model (see select_targets)."""
  return select_targets(_lora(cfg)['targets'], moe=transformer.is_moe(_mcfg(cfg)))


def _with_targets(cfg, targets):
  lc = _lora(cfg)
  lc = lc.to_dict() if hasattr(lc, 'to_dict') else dict(lc)
  return {'model': _mcfg(cfg), 'lora': dict(lc, targets=targets)}


def path_str(name: str) -> str:
  """'q' -> 'layers/attn/q', the string regex targets are matched against."""
  return '/'.join(TARGETS[name][0])


ATTENTION_TARGETS = ('q', 'k', 'v', 'o')


def select_targets(targets: str | Sequence[str], moe: bool = False) -> list[str]:
  """cfg.lora.targets -> target names in TARGETS order.

  'all-linear' (every projection; not the embeddings or lm_head, as in PEFT); a list or
  comma-separated string of names ('q,v', 'q_proj,v_proj'); else a regex that must
  match a whole param path ('layers/attn/(q|v)', 'layers/mlp/.*').
  moe: the model is a mixture of experts, whose feed-forward is not adapted: 'all-linear'
  is the attention projections (as PEFT's all-linear on transformers' Mixtral, whose
  experts are not nn.Linear), and an MLP target is an error.
  """
  chosen = _select_targets(targets)
  if moe and targets != 'all-linear' and str(targets).strip() != 'all-linear':
    mlp = [n for n in chosen if n not in ATTENTION_TARGETS]
    if mlp:
      raise LoraError(f'lora.targets: {", ".join(mlp)}: a mixture-of-experts model has no '
                      'dense MLP projections to adapt; target the attention projections '
                      '(q,k,v,o or all-linear)')
  return [n for n in chosen if n in ATTENTION_TARGETS] if moe else chosen


def _select_targets(targets: str | Sequence[str]) -> list[str]:
  if isinstance(targets, str):
    if targets.strip() == 'all-linear':
      return list(TARGETS)
    items = [t.strip() for t in targets.split(',') if t.strip()]
    if items and all(t in TARGETS or t in _PEFT_NAMES for t in items):
      targets = items
    else:
      try:
        pattern = re.compile(targets)
      except re.error as e:
        raise LoraError(f'lora.targets={targets!r} is neither target names '
                        f'({", ".join(TARGETS)}) nor a valid regex: {e}') from None
      chosen = [n for n in TARGETS if pattern.fullmatch(path_str(n))]
      if not chosen:
        raise LoraError(f'lora.targets={targets!r} matches no projection (paths: '
                        f'{", ".join(path_str(n) for n in TARGETS)})')
      return chosen
  names = {_PEFT_NAMES.get(t, t) for t in targets}
  unknown = sorted(names - set(TARGETS))
  if unknown or not names:
    raise LoraError(f'lora.targets: unknown target(s) {unknown or targets!r} '
                    f'(known: {", ".join(TARGETS)}, or all-linear, or a regex)')
  return [n for n in TARGETS if n in names]


def _param_paths(cfg) -> dict:
  """{'embed': (shape, logical axes), 'layers/attn/q': ...} of every base param."""
  _, abstract = transformer.abstract(_mcfg(cfg))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  shps = nnx.to_pure_dict(abstract)
  out = {}

  def walk(node, spec, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, spec[k], prefix + (k,))
      else:
        out['/'.join(prefix + (k,))] = (tuple(v.shape), tuple(spec[k]))
  walk(shps, specs, ())
  return out


def full_params(cfg) -> list[str]:
  """Paths of the base params cfg.lora.train_params (a regex matched in full, '' = none)
  trains fully, e.g. 'embed', 'embed|lm_head', 'final_norm/scale', '.*norm/scale'."""
  pattern = _lora(cfg).get('train_params', '')
  if not pattern:
    return []
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise LoraError(f'lora.train_params={pattern!r} is not a valid regex: {e}') from None
  paths = _param_paths(cfg)
  chosen = [p for p in paths if rx.fullmatch(p)]
  if not chosen:
    raise LoraError(f'lora.train_params={pattern!r} matches no param (paths: '
                    f'{", ".join(paths)})')
  return chosen


def validate(cfg) -> None:
  """Checks cfg.lora (raises LoraError naming the field)."""
  lc = _lora(cfg)
  targets(cfg)
  full_params(cfg)
  if int(lc['rank']) <= 0:
    raise LoraError(f'lora.rank must be positive, got {lc["rank"]}')
  if not 0.0 <= float(lc['dropout']) < 1.0:
    raise LoraError(f'lora.dropout must be in [0, 1), got {lc["dropout"]}')
  if lc['base_dtype'] not in transformer.DTYPES:
    raise LoraError(f'lora.base_dtype must be one of {tuple(transformer.DTYPES)}, '
                    f'got {lc["base_dtype"]!r}')


def scale(cfg) -> float:
  """alpha / rank, or alpha / sqrt(rank) with lora.rslora."""
  return transformer.lora_scale(_lora(cfg))


def _base(cfg):
  """{target: (shape, logical axes)} of the base weights, stacked on 'layers'."""
  _, abstract = transformer.abstract(_mcfg(cfg))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  shapes = nnx.to_pure_dict(abstract)
  out = {}
  for name in targets(cfg):
    path = TARGETS[name][0]
    shape, spec = shapes, specs
    for k in path:
      shape, spec = shape[k], spec[k]
    out[name] = (tuple(shape.shape), tuple(spec))
  return out


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _layout(cfg):
  """{target: ((A shape, A axes), (B shape, B axes))}, layers axis first."""
  r = int(_lora(cfg)['rank'])
  out = {}
  for name, (shape, axes) in _base(cfg).items():
    n_in = TARGETS[name][1]
    (l, *dims), (la, *dax) = shape, axes
    a = ((l, *dims[:n_in], r), (la, *dax[:n_in], None))
    b = ((l, r, *dims[n_in:]), (la, None, *dax[n_in:]))
    out[name] = (a, b)
  return out


def logical_axes(cfg) -> dict:
  """PartitionSpecs of logical axis names for each adapter leaf: A takes its base
  weight's input axes (rank unsharded), B its output axes, so `cfg.rules` shards them;
  a fully trained param (train_params) is sharded like its base."""
  tree: dict = {}
  for name, (a, b) in _layout(cfg).items():
    _set(tree, TARGETS[name][0], {'a': P(*a[1]), 'b': P(*b[1])})
  paths = _param_paths(cfg)
  for path in full_params(cfg):
    _set(tree, ('full',) + tuple(path.split('/')), P(*paths[path][1]))
  return tree


def shapes(cfg) -> dict:
  """float32 ShapeDtypeStructs of the adapters (and of the train_params copies)."""
  tree: dict = {}
  for name, (a, b) in _layout(cfg).items():
    _set(tree, TARGETS[name][0], {'a': jax.ShapeDtypeStruct(a[0], jnp.float32),
                                  'b': jax.ShapeDtypeStruct(b[0], jnp.float32)})
  paths = _param_paths(cfg)
  for path in full_params(cfg):
    _set(tree, ('full',) + tuple(path.split('/')),
         jax.ShapeDtypeStruct(paths[path][0], jnp.float32))
  return tree


def shardings(cfg, mesh, rules=None) -> dict:
  """NamedShardings of the adapters on `mesh` under `rules` (default cfg.rules)."""
  rules = dict(cfg['rules'] if rules is None else rules)
  return sharding.tree_shardings(logical_axes(cfg), shapes(cfg), mesh, rules)


def init_fn(cfg):
  """A pure (key, base params) -> fresh adapters function (for use inside a jitted init);
  the params are read only for train_params (their float32 copies)."""
  layout, full = _layout(cfg), full_params(cfg)

  def init(key, params=None):
    tree: dict = {}
    for path in full:
      keys = tuple(path.split('/'))
      if params is None:
        raise LoraError(f'lora.train_params {path!r}: the adapters start from the base '
                        'params; pass them')
      _set(tree, ('full',) + keys, _get(params, keys).astype(jnp.float32))
    for i, (name, (a, b)) in enumerate(layout.items()):
      n_in = TARGETS[name][1]
      bound = 1.0 / math.sqrt(math.prod(a[0][1:1 + n_in]))
      A = jax.random.uniform(jax.random.fold_in(key, i), a[0], jnp.float32, -bound, bound)
      _set(tree, TARGETS[name][0], {'a': A, 'b': jnp.zeros(b[0], jnp.float32)})
    return tree

  return init


def init_adapters(key, cfg, mesh=None, rules=None, params=None) -> dict:
  """Fresh float32 adapters: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer (PEFT's
  kaiming_uniform_(a=sqrt(5))), B = 0 (and copies of `params`' train_params leaves).
  With `mesh`, created directly sharded."""
  init = init_fn(cfg)
  if mesh is None:
    return jax.jit(init)(key, params)
  rules = dict(cfg['rules'] if rules is None else rules)
  with sharding.use_mesh(mesh, rules):
    return jax.jit(init, out_shardings=shardings(cfg, mesh, rules))(key, params)


def effective_params(params: dict, adapters: dict | None) -> dict:
  """params with adapters['full'] (train_params) in place of their base leaves, cast to
  the base leaves' dtypes; the params themselves when there are none."""
  if not adapters or 'full' not in adapters:
    return params
  out = jax.tree.map(lambda x: x, params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(adapters['full']):
    keys = tuple(str(getattr(k, 'key', k)) for k in path)
    _set(out, keys, leaf.astype(_get(params, keys).dtype))
  return out


def adapter_param_count(cfg_or_adapters) -> int:
  """Trainable parameters: of a config (sum over targets of L·r·(fan_in + fan_out)) or
  of an adapter tree."""
  if isinstance(cfg_or_adapters, dict) and 'layers' in cfg_or_adapters:
    tree = cfg_or_adapters
  else:
    tree = shapes(cfg_or_adapters)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def targets_of(adapters: dict) -> list[str]:
  """Target names present in an adapter tree, in TARGETS order."""
  return [n for n, (path, _, _) in TARGETS.items() if _has(adapters, path)]


def _has(tree, path):
  try:
    _get(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def _delta(a, b):
  """Stacked A [L, *in, r], B [L, r, *out] -> A@B [L, *in, *out] (float32)."""
  return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(
      a.astype(jnp.float32), b.astype(jnp.float32))


def merge(params: dict, adapters: dict, cfg) -> dict:
  """params with W + s·A@B for every adapted weight (computed in float32, stored in the
  weight's dtype); other leaves are the same arrays. Jit it for sharded params."""
  s = scale(cfg)
  out = jax.tree.map(lambda x: x, effective_params(params, adapters))  # a new dict tree
  for name in targets_of(adapters):
    path = TARGETS[name][0]
    ad, w = _get(adapters, path), _get(params, path)
    merged = w.astype(jnp.float32) + s * _delta(ad['a'], ad['b'])
    _set(out, path, merged.astype(w.dtype))
  return out


def base_params(params: dict, cfg) -> dict:
  """The frozen base params held in lora.base_dtype (float leaves cast)."""
  dt = transformer.DTYPES[_lora(cfg)['base_dtype']]
  return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)


# ---- PEFT -----------------------------------------------------------------------------

def to_peft_state_dict(adapters: dict, cfg=None) -> dict[str, np.ndarray]:
  """Adapters -> PEFT's saved state dict ({'base_model.model.model.layers.{i}.
  self_attn.q_proj.lora_A.weight': [r, in], '... .lora_B.weight': [out, r]}), numpy
  float32 (gathered to the host)."""
  del cfg  # the layout follows from the adapters
  if 'full' in adapters:
    raise LoraError('lora.train_params: PEFT export of fully trained base params '
                    '(modules_to_save) is not supported; merge the run instead '
                    '(tools/merge_lora.py --out, or convert_hf.py export)')
  out = {}
  for name in targets_of(adapters):
    path, n_in, module = TARGETS[name]
    ad = _get(adapters, path)
    a = np.asarray(jax.device_get(ad['a']), np.float32)
    b = np.asarray(jax.device_get(ad['b']), np.float32)
    r = a.shape[-1]
    for i in range(a.shape[0]):
      prefix = _PEFT_PREFIX.format(i=i) + module
      out[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      out[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  return out


_PEFT_KEY = re.compile(r'(?:base_model\.model\.)?model\.layers\.(\d+)\.'
                       r'(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.'
                       r'lora_([AB])(?:\.[^.]+)?\.weight')
_PEFT_MODULES = ', '.join(v[2].split('.')[-1] for v in TARGETS.values())  # 'q_proj, ...'


def _peft_tensors(state_dict: dict) -> dict:
  """{target: {'a' | 'b': {layer: float32 numpy}}} of the LoRA weights in a PEFT state
  dict (PEFT's lora_A [r, in] and lora_B [out, r] as stored)."""
  by_module = {v[2]: k for k, v in TARGETS.items()}
  found: dict = {}
  for key, value in state_dict.items():
    m = _PEFT_KEY.fullmatch(key)
    if m is None:
      if 'lora_' in key:
        raise LoraError(f'PEFT tensor {key!r} is not a LoRA weight of a supported module '
                        f'(lmjax adapts {_PEFT_MODULES} of each layer)')
      continue
    i, module, which = int(m.group(1)), m.group(2), m.group(3).lower()
    x = value.float().numpy() if hasattr(value, 'numpy') and hasattr(value, 'float') \
        else np.asarray(value, np.float32)
    found.setdefault(by_module[module], {}).setdefault(which, {})[i] = x
  if not found:
    raise LoraError('the PEFT state dict holds no LoRA weights')
  return found


def _adapters_from(found: dict, cfg) -> dict:
  """_peft_tensors' weights -> float32 adapters in lmjax layouts, checked against the
  shapes cfg.model and cfg.lora.rank give."""
  mcfg, r = _mcfg(cfg), int(_lora(cfg)['rank'])
  shp = shapes(_with_targets(cfg, ','.join(found)))
  tree: dict = {}
  for name, parts in found.items():
    path = TARGETS[name][0]
    want = _get(shp, path)
    leaf = {}
    for which in ('a', 'b'):
      layers = parts.get(which, {})
      if sorted(layers) != list(range(mcfg['n_layers'])):
        raise LoraError(f'PEFT lora_{which.upper()} of {TARGETS[name][2]}: layers '
                        f'{sorted(layers)}, expected 0..{mcfg["n_layers"] - 1} (one per '
                        'layer of the base model)')
      shape = want[which].shape
      expect = ((r, math.prod(shape[1:-1])) if which == 'a'
                else (math.prod(shape[2:]), r))
      per = []
      for i in range(mcfg['n_layers']):
        x = layers[i]
        if x.shape != expect:
          raise LoraError(f'PEFT layer {i} {TARGETS[name][2]}.lora_{which.upper()} has '
                          f'shape {x.shape}, expected {expect} from rank {r} and the base '
                          'model (is the adapter for a different base?)')
        per.append(x.T.reshape(shape[1:]))
      leaf[which] = np.stack(per).astype(np.float32)
    _set(tree, path, leaf)
  return tree


def from_peft_state_dict(state_dict: dict, cfg) -> dict:
  """PEFT's LoRA state dict (as saved, or a PeftModel's `state_dict()` with adapter
  names) -> float32 adapters in lmjax layouts (host numpy arrays). The targets are those
  present; shapes are checked against cfg.model and cfg.lora.rank."""
  return _adapters_from(_peft_tensors(state_dict), cfg)


# PEFT's LoraConfig defaults for what lmjax reads from adapter_config.json.
_PEFT_DEFAULTS = {'r': 8, 'lora_alpha': 8, 'use_rslora': False, 'lora_dropout': 0.0}
# cfg.lora field: adapter_config.json field, for the settings an adapter defines.
_FROM_PEFT = {'rank': 'r', 'alpha': 'lora_alpha', 'rslora': 'use_rslora',
              'targets': 'target_modules'}
# adapter_config.json fields that make an adapter compute more than W + s·A@B on the same
# modules of every layer: refused unless they hold PEFT's default (false, null, empty).
_PEFT_UNSUPPORTED = {
    'use_dora': 'DoRA', 'lora_bias': 'a bias on lora_B',
    'fan_in_fan_out': 'transposed (Conv1D) weights',
    'modules_to_save': 'fully trained modules', 'rank_pattern': 'per-module ranks',
    'alpha_pattern': 'per-module alphas', 'layers_to_transform': 'some layers only',
    'exclude_modules': 'excluded modules', 'layer_replication': 'replicated layers',
    'trainable_token_indices': 'trained token embeddings',
    'target_parameters': 'adapted parameters', 'use_qalora': 'QALoRA',
    'use_bdlora': 'block-diagonal LoRA', 'alora_invocation_tokens': 'activated LoRA',
    'velora_config': 'VeLoRA', 'monteclora_config': 'MonteCLoRA', 'kasa_config': 'KaSA',
    'arrow_config': 'Arrow routing',
}
_MERGE_FIX = 'merge it into its base with PEFT (merge_and_unload) and load that model'
_NOT_ADAPTABLE = ('model.embed_tokens', 'lm_head')


def _peft_target_names(target_modules, n_layers: int, where: str) -> list[str]:
  """adapter_config.json target_modules -> lmjax target names, as PEFT matches them
  against the base's module names: a list entry names a module or a dotted suffix of
  one, a string is 'all-linear' or a regex matched in full; null is PEFT's default for
  Llama-family models (q_proj, v_proj). Every layer must be adapted alike."""
  if target_modules is None:
    return ['q', 'v']
  if isinstance(target_modules, str) and target_modules.lower() == 'all-linear':
    # PEFT: every linear layer but the output head
    return list(TARGETS)
  keys = {(i, n): f'model.layers.{i}.{TARGETS[n][2]}'
          for i in range(n_layers) for n in TARGETS}
  if isinstance(target_modules, str):
    try:
      rx = re.compile(target_modules)
    except re.error as e:
      raise LoraError(f'{where}adapter_config.json target_modules={target_modules!r} is '
                      f'not a valid regex: {e}') from None
    entries = [(target_modules, lambda k: rx.fullmatch(k) is not None)]
  else:
    entries = [(t, lambda k, t=t: k == t or k.endswith('.' + t)) for t in target_modules]
  hit = set()
  for t, match in entries:
    got = {ix for ix, k in keys.items() if match(k)}
    other = [k.split('.')[-1] for k in _NOT_ADAPTABLE if match(k)]
    if other or not got:
      raise LoraError(f'{where}adapter_config.json target_modules {t!r} '
                      + (f'adapts {", ".join(other)}' if other else 'names no projection')
                      + f': lmjax adapts only {_PEFT_MODULES}; {_MERGE_FIX}')
    hit |= got
  names = [n for n in TARGETS if any((i, n) in hit for i in range(n_layers))]
  for n in names:
    if not all((i, n) in hit for i in range(n_layers)):
      raise LoraError(f'{where}adapter_config.json target_modules={target_modules!r} '
                      f'adapts {TARGETS[n][2]} in some layers only: lmjax adapts every '
                      f'layer alike; {_MERGE_FIX}')
  return names


def from_peft_config(adapter_config: dict, cfg, lora=None, where: str = '') \
    -> ml_collections.ConfigDict:
  """The LoRA settings a PEFT adapter_config.json defines: cfg.lora's fields with rank,
  alpha, rslora, targets and dropout from r, lora_alpha, use_rslora, target_modules and
  lora_dropout (PEFT's defaults where absent), train_params '' and the fields of `lora`
  on top.

  `lora` (a dict, optional) holds the cfg.lora fields the caller set explicitly (cfg.lora
  itself is only defaults): a rank, alpha, rslora or targets that disagrees with the
  adapter is a LoraError naming both values; dropout and base_dtype may differ. Fields of
  adapter_config.json that would make lmjax compute something else than PEFT (DoRA,
  biases, modules_to_save, per-module ranks, some layers only, embed_tokens/lm_head
  targets, ...) are refused. `where` prefixes the messages (the adapter dir).
  """
  where = f'{where}: ' if where else ''
  pc = dict(adapter_config)
  if pc.get('peft_type', 'LORA') != 'LORA':
    raise LoraError(f'{where}adapter_config.json peft_type={pc["peft_type"]!r}: lmjax '
                    "reads LoRA adapters only (peft_type 'LORA')")
  if pc.get('bias', 'none') != 'none':
    raise LoraError(f"{where}adapter_config.json bias={pc['bias']!r} is not supported "
                    f"(only 'none'); {_MERGE_FIX}")
  for key, what in _PEFT_UNSUPPORTED.items():
    v = pc.get(key)
    if not (v is None or v is False or (isinstance(v, (str, list, dict)) and not v)):
      raise LoraError(f'{where}adapter_config.json {key}={pc[key]!r} ({what}) is not '
                      f'supported; {_MERGE_FIX}')
  base = _lora(cfg) if 'lora' in cfg else {}
  base = base.to_dict() if hasattr(base, 'to_dict') else dict(base)
  explicit = dict(lora or {})
  known = set(base) | set(_FROM_PEFT) | {'dropout', 'base_dtype', 'train_params', 'enabled'}
  unknown = sorted(set(explicit) - known)
  if unknown:
    raise LoraError(f'load_peft_adapter: lora={unknown} are not cfg.lora fields '
                    f'(known: {", ".join(sorted(known))})')
  rank = pc.get('r', _PEFT_DEFAULTS['r'])
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise LoraError(f'{where}adapter_config.json r={rank!r} is not a positive integer')
  names = _peft_target_names(pc.get('target_modules'), int(_mcfg(cfg)['n_layers']), where)
  moe = transformer.is_moe(_mcfg(cfg))
  if moe:  # a mixture of experts: its attention projections only (see select_targets)
    names = select_targets(names if pc.get('target_modules') != 'all-linear'
                           else 'all-linear', moe=True)
  ours = {'rank': rank, 'alpha': float(pc.get('lora_alpha', _PEFT_DEFAULTS['lora_alpha'])),
          'rslora': bool(pc.get('use_rslora', _PEFT_DEFAULTS['use_rslora'])),
          'targets': ','.join(names)}
  for field, value in ours.items():
    if field not in explicit:
      continue
    set_value = explicit[field]
    same = (select_targets(set_value, moe=moe) == names if field == 'targets'
            else type(value)(set_value) == value)
    if not same:
      peft_key = _FROM_PEFT[field]
      raise LoraError(f'{where}lora.{field}={set_value!r} (set) but adapter_config.json '
                      f'{peft_key}={pc.get(peft_key, _PEFT_DEFAULTS.get(peft_key))!r}; '
                      f'drop lora.{field} to use the adapter\'s')
  if explicit.get('train_params'):
    raise LoraError(f'{where}lora.train_params={explicit["train_params"]!r} (set) but a '
                    'PEFT adapter without modules_to_save trains no base params; '
                    "set it to ''")
  settings = dict(base, train_params='',
                  dropout=float(pc.get('lora_dropout') or _PEFT_DEFAULTS['lora_dropout']))
  settings.update({k: v for k, v in explicit.items() if k not in ours})
  settings.update(ours)
  return ml_collections.ConfigDict(settings)


def peft_config(cfg, adapters: dict | None = None,
                base_model_name_or_path: str | None = None) -> dict:
  """adapter_config.json for PEFT's LoraConfig (targets those of `adapters` if given)."""
  lc = _lora(cfg)
  names = targets_of(adapters) if adapters is not None else targets(cfg)
  return dict(
      peft_type='LORA', task_type='CAUSAL_LM', r=int(lc['rank']),
      lora_alpha=float(lc['alpha']), lora_dropout=float(lc['dropout']),
      use_rslora=bool(lc['rslora']), target_modules=sorted(TARGETS[n][2].split('.')[-1]
                                                           for n in names),
      bias='none', fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
      modules_to_save=None, base_model_name_or_path=base_model_name_or_path)


def save_peft_adapter(adapters: dict, cfg, out_dir: str,
                      base_model_name_or_path: str | None = None) -> list[str]:
  """Writes adapter_model.safetensors + adapter_config.json, loadable with
  `peft.PeftModel.from_pretrained(base_model, out_dir)`. Every process must call it
  (adapters are gathered); process 0 writes. Returns the paths."""
  from safetensors.numpy import save_file
  tensors = to_peft_state_dict(adapters, cfg)
  paths = [os.path.join(out_dir, ADAPTER_FILE), os.path.join(out_dir, ADAPTER_CONFIG)]
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, paths[0], metadata={'format': 'pt'})
    with open(paths[1], 'w') as f:
      json.dump(peft_config(cfg, adapters, base_model_name_or_path), f, indent=2,
                sort_keys=True)
      f.write('\n')
  return paths


def load_peft_adapter(in_dir: str, cfg,
                      lora=None) -> tuple[dict, ml_collections.ConfigDict]:
  """A PEFT adapter dir (adapter_config.json + adapter_model.safetensors) -> (adapters as
  host numpy arrays, the LoRA settings they need).

  The adapter defines its own LoRA config: the settings are from_peft_config's (rank,
  alpha, rslora and targets from adapter_config.json; `lora` = the cfg.lora fields the
  caller set explicitly, which must agree; unsupported PEFT features refused). The
  safetensors must hold LoRA weights of exactly those modules, of rank r, on every
  layer, shaped for cfg.model (the adapter's base must be this architecture). Use both
  together: `lora.merge(params, adapters, settings)` or
  `model(tokens, adapters=adapters, lora=settings)`.
  """
  from safetensors.numpy import load_file
  paths = [os.path.join(in_dir, name) for name in (ADAPTER_CONFIG, ADAPTER_FILE)]
  missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
  if missing:
    raise NotFoundError(f'{in_dir} is not a PEFT adapter directory (no '
                        f'{" or ".join(missing)})')
  with open(paths[0]) as f:
    try:
      pc = json.load(f)
    except json.JSONDecodeError as e:
      raise LoraError(f'{paths[0]} is not valid JSON ({e})') from None
  settings = from_peft_config(pc, cfg, lora, where=in_dir)
  try:
    tensors = load_file(paths[1])
  except Exception as e:  # pylint: disable=broad-except  (safetensors' own error type)
    raise LoraError(f'{paths[1]} is not a readable safetensors file ({e})') from None
  try:
    found = _peft_tensors(tensors)
  except LoraError as e:
    raise LoraError(f'{paths[1]}: {e}') from None
  moe = transformer.is_moe(_mcfg(cfg))
  got, want = [n for n in TARGETS if n in found], select_targets(settings.targets, moe=moe)
  if got != want:
    names = lambda ns: ', '.join(TARGETS[n][2].split('.')[-1] for n in ns)
    raise LoraError(f'{in_dir}: adapter_config.json target_modules='
                    f'{pc.get("target_modules")!r} ({names(want)}) but {ADAPTER_FILE} holds '
                    f'LoRA weights of {names(got)}')
  ranks = {x.shape[0] for p in found.values() for x in p.get('a', {}).values()}
  ranks |= {x.shape[-1] for p in found.values() for x in p.get('b', {}).values()}
  if ranks - {settings.rank}:
    raise LoraError(f'{in_dir}: adapter_config.json r={settings.rank} but {ADAPTER_FILE} '
                    f'holds rank-{sorted(ranks - {settings.rank})[0]} LoRA weights')
  try:
    adapters = _adapters_from(found, {'model': _mcfg(cfg), 'lora': settings})
  except LoraError as e:
    base = pc.get('base_model_name_or_path')
    raise LoraError(f'{in_dir}: {e}' + (f' (its base: {base})' if base else '')) from None
  return adapters, settings


def describe(cfg) -> str:
  """One line for logs: targets, rank, scale, trainable parameter count."""
  lc = _lora(cfg)
  full = full_params(cfg)
  return (f'LoRA r={lc["rank"]} alpha={lc["alpha"]} scale={scale(cfg):.4g} '
          f'targets={",".join(targets(cfg))} '
          + (f'train_params={",".join(full)} ' if full else '')
          + f'params={adapter_param_count(cfg):,}')

