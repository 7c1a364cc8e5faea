"""Reading a run's params: an lmjax checkpoint, a LoRA run merged onto its base, or a
Hugging Face model.

    source = weights.open_init_source(cfg.init_from)   # what a new run starts from
    params = source.load_params(cfg, setup)             # placed for the new run's mesh
    params, cfg, meta, step = weights.load_params(workdir)  # a run's params, for inference
    weights.export_workdir(workdir, out_dir)            # ... written as a Hugging Face model

`InitSource` reads the params a new run starts from (cfg.init_from): another lmjax
workdir's checkpoint, restored straight into the new run's shardings (any mesh), or a
Hugging Face model directory (through lmjax.hf). A source with a next-token head read for
a reward model (model.head='score') gives its body and a fresh score head: the lm_head is
dropped, the score drawn from a normal of std model.init_std, seeded by the run's seed
(so a LoRA run, whose frozen base is re-read on resume, finds the same one).

This module sits above checkpoint.py (Orbax) and hf.py (safetensors), which do not
import it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp

from lmjax import checkpoint as ckpt_lib
from lmjax import hf, sharding
from lmjax.checkpoint import HF_META_KEYS, Checkpointer, CheckpointError
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.models import lora
from lmjax.models import transformer
from lmjax.train import state as state_lib


def is_hf_dir(path: str) -> bool:
  """A Hugging Face model directory: config.json + *.safetensors."""
  return (os.path.isfile(os.path.join(path, 'config.json'))
          and bool(glob.glob(os.path.join(path, '*.safetensors'))))


def detect_format(path: str) -> str:
  """'lmjax' (a workdir with checkpoints/) or 'hf' (config.json + *.safetensors)."""
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return 'lmjax'
  if is_hf_dir(path):
    return 'hf'
  if not os.path.exists(path):
    raise CheckpointError(f'init_from.path {path!r} does not exist')
  raise CheckpointError(f'init_from.path {path!r} is neither an lmjax workdir (with '
                        'checkpoints/) nor a Hugging Face model dir (config.json + '
                        '*.safetensors)')


# ---- A fresh reward head on a language model's body -----------------------------------

def source_head(model: dict) -> str:
  """The head of a source's model fields: 'lm' when they predate model.head."""
  return model.get('head') or 'lm'


def score_key(seed: int):
  """The key a fresh score head is drawn from (distinct from the params' init key)."""
  return jax.random.fold_in(jax.random.key(seed), 4)


def _lm_abstract(cfg, abstract: Any):
  """(the config with model.head='lm', the ShapeDtypeStructs of its params): `abstract`'s
  (a score-head model's) with lm_head in place of score, same dtypes and mesh."""
  lm_cfg = cfg.copy_and_resolve_references()
  with lm_cfg.unlocked():
    lm_cfg.model.head = 'lm'
  _, specs, shapes = state_lib.logical_param_specs(lm_cfg)
  mesh = jax.tree.leaves(abstract)[0].sharding.mesh
  shardings = sharding.tree_shardings(specs, shapes, mesh, dict(cfg.rules))
  dtype = abstract['embed'].dtype
  out = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
      a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=s),
                     shapes, shardings)
  return lm_cfg, out


def with_fresh_score(params: dict, cfg, abstract: Any) -> dict:
  """A language model's params as a reward model's: lm_head dropped, a fresh `score`
  [D, 1] ~ normal(model.init_std) from score_key(cfg.seed), placed as abstract['score']."""
  a = abstract['score']
  draw = lambda key: (cfg.model.init_std * jax.random.normal(key, a.shape, jnp.float32)
                      ).astype(a.dtype)
  score = jax.jit(draw, out_shardings=a.sharding)(score_key(cfg.seed))
  out = {k: v for k, v in params.items() if k != 'lm_head'}
  out['score'] = score
  return out


# ---- Starting from another run (cfg.init_from) ------------------------------------------

@dataclasses.dataclass
class InitSource:
  """The run a new run starts from: where it is, and what its params and tokenizer are.

  model: the source's model fields (those it defines), to check against the new config.
  tokenizer_path: the tokenizer the source was trained with ('' if it names none).
  hf_config, hf_generation_config: the Hugging Face config.json and
    generation_config.json of the model the source came from (None if none).
  """
  path: str
  format: str            # 'lmjax' | 'hf'
  step: int | None       # lmjax: the checkpoint step read
  model: dict
  tokenizer_path: str
  hf_config: dict | None = None
  hf_generation_config: dict | None = None

  def __str__(self) -> str:
    return self.path + (f' (step {self.step})' if self.step is not None else ' (Hugging Face)')

  def load_params(self, cfg, setup) -> Any:
    """The source's params, placed with setup's param shardings (the new mesh)."""
    return self.read_params(cfg, setup.abstract_state['params'], setup.mesh, setup.rules)

  def read_params(self, cfg, abstract: Any, mesh, rules) -> Any:
    """The source's params with `abstract`'s shardings and dtypes (a LoRA run's: its base
    with its adapters merged). A next-token model read for a reward model (cfg's
    model.head='score'): its body and a fresh score head (with_fresh_score)."""
    if (transformer.head_kind(cfg.model) == 'score'
        and source_head(self.model) == 'lm'):
      lm_cfg, lm_abstract = _lm_abstract(cfg, abstract)
      return with_fresh_score(self._read(lm_cfg, lm_abstract, mesh, rules), cfg, abstract)
    return self._read(cfg, abstract, mesh, rules)

  def _read(self, cfg, abstract, mesh, rules):
    if self.format == 'lmjax':
      return _restore_merged(self.path, self.step, abstract)
    params = hf.load_params(self.path, cfg, mesh=mesh, rules=rules)
    params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract)
    return jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))


def _restore_merged(workdir: str, step: int | None, abstract: Any) -> Any:
  """The params of an lmjax checkpoint, restored into `abstract` (ShapeDtypeStructs with
  shardings). A LoRA run's checkpoint holds adapters only: its params are its base (the
  init_from recorded in its meta, read the same way) with the adapters merged."""
  ckpt = Checkpointer(workdir, None, read_only=True)
  try:
    step = ckpt.resolve_step(step)
    saved = ckpt.read_config(step)
    if not saved.lora.enabled:
      return ckpt.restore_params(abstract, step)
    meta = ckpt.read_meta(step)
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    rules = dict(saved.rules)
    ad_sh = lora.shardings(saved, mesh, rules)
    ad_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               lora.shapes(saved), ad_sh)
    adapters = ckpt.restore_params(ad_abstract, step, key='adapters')
  finally:
    ckpt.close()
  base_ref = meta.get('init_from')
  if not base_ref:
    raise CheckpointError(f'{ckpt.directory}/{step} is a LoRA checkpoint without the '
                          'pointer to its base (meta init_from)')
  base = base_source(base_ref, ckpt.directory).read_params(saved, abstract, mesh, rules)
  param_sh = jax.tree.map(lambda a: a.sharding, abstract)
  with sharding.use_mesh(mesh, rules):
    return jax.jit(lambda p, a: lora.merge(p, a, saved), out_shardings=param_sh,
                   donate_argnums=(0,))(base, adapters)


def base_source(base_ref: dict, where: str) -> InitSource:
  """The InitSource a LoRA checkpoint's meta points to ({'path', 'format', 'step'})."""
  if not os.path.exists(base_ref['path']):
    raise CheckpointError(f'the base model of the LoRA checkpoint {where} is missing: '
                          f'{base_ref["path"]} (the adapters need it; restore it there)')
  step = base_ref.get('step')
  return open_init_source({'path': base_ref['path'], 'format': base_ref['format'],
                           'step': -1 if step is None else int(step)})


def open_init_source(cfg_init) -> InitSource:
  """Reads what cfg.init_from (or a dict with its path, step, format) names: config and
  metadata, no arrays yet."""
  path = os.path.abspath(os.path.expanduser(cfg_init['path']))
  fmt = detect_format(path) if cfg_init['format'] == 'auto' else cfg_init['format']
  if fmt == 'lmjax':
    source = Checkpointer(path, None, read_only=True)
    try:
      step = source.resolve_step(None if cfg_init['step'] < 0 else int(cfg_init['step']))
      saved = source.read_config(step)
      meta = source.read_meta(step)
      tokenizer = meta.get('tokenizer', '')
    finally:
      source.close()
    if 'tokenizer' not in meta:  # saved before meta recorded it: resolve it as that run did
      tokenizer = tokenizer_lib.resolve_path(saved)
    return InitSource(path, fmt, step, saved.model.to_dict(), tokenizer,
                      **{k: meta.get(k) for k in HF_META_KEYS})
  if fmt == 'hf':
    hf_config = hf.read_hf_config(path)
    model = dict(hf.model_overrides_from_hf(hf_config))
    tok = path if tokenizer_lib.is_tokenizer_dir(path) else ''  # tokenizer.json / .model
    return InitSource(path, fmt, None, model, tok,
                      hf_config=hf_config, hf_generation_config=hf.read_generation_config(path))
  raise CheckpointError(f"init_from.format must be 'auto', 'lmjax' or 'hf', got {fmt!r}")


# ---- Reading a run's params for inference or export ------------------------------------

def load_params(workdir: str, step: int | None = None, mesh=None):
  """(params, cfg, meta, step) of an lmjax workdir's checkpoint (latest, or `step`), reading
  only the params (not the optimizer state), placed for `mesh` by the run's own rules.
  Default mesh: FSDP over all devices. Any training mesh restores onto any other. A LoRA
  run's params are its base with the adapters merged (see load_adapters for them alone)."""
  ckpt = Checkpointer(workdir, None, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise CheckpointError(f'no checkpoint found under {ckpt.directory}')
    step = ckpt.resolve_step(step)
    cfg, meta = ckpt.read_config(step), ckpt.read_meta(step)
  finally:
    ckpt.close()
  if mesh is None:
    mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  _, specs, shapes = state_lib.logical_param_specs(cfg)
  shardings = sharding.tree_shardings(specs, shapes, mesh, dict(cfg.rules))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  return _restore_merged(workdir, step, abstract), cfg, meta, step


def load_adapters(workdir: str, step: int | None = None, mesh=None):
  """(adapters, cfg, meta, step) of a LoRA run's checkpoint (float32, sharded for `mesh`
  by the run's rules; default all devices on fsdp)."""
  ckpt = Checkpointer(workdir, None, read_only=True)
  try:
    step = ckpt.resolve_step(step)
    cfg, meta = ckpt.read_config(step), ckpt.read_meta(step)
    if not cfg.lora.enabled:
      raise CheckpointError(f'{ckpt.directory}/{step} is not a LoRA run (lora.enabled is '
                            'False in its config): it has no adapters')
    if mesh is None:
      mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            lora.shapes(cfg), lora.shardings(cfg, mesh, dict(cfg.rules)))
    return ckpt.restore_params(abstract, step, key='adapters'), cfg, meta, step
  finally:
    ckpt.close()


def write_merged(workdir: str, out: str, step: int | None = None, mesh=None) -> int:
  """Writes a LoRA run's checkpoint (latest, or `step`) with the adapters merged into its
  base as a full lmjax checkpoint in `out` (params only, no optimizer state): loadable with
  lmjax.load and as another run's init_from, without the base. Returns the step."""
  params, cfg, meta, step = load_params(workdir, step, mesh)
  if not cfg.lora.enabled:
    raise CheckpointError(f'{workdir} is not a LoRA run (lora.enabled is False in its '
                          'config): its checkpoints are full already')
  merged_cfg = cfg.copy_and_resolve_references()
  with merged_cfg.unlocked():
    merged_cfg.lora.enabled = False
    merged_cfg.init_from.path = ''
    merged_cfg.checkpoint.async_save = False
  ckpt = Checkpointer(out, merged_cfg)
  try:
    if ckpt.latest_step() is not None:
      raise CheckpointError(f'{ckpt.directory} has checkpoints already; choose a new --out')
    ckpt.save(step, {'step': jnp.asarray(step, jnp.int32), 'params': params}, merged_cfg,
              force=True, meta={'tokenizer': meta.get('tokenizer', ''), 'init_from': None,
                                'merged_from': {'path': os.path.abspath(workdir), 'step': step,
                                                'base': meta.get('init_from')},
                                **{k: meta.get(k) for k in HF_META_KEYS}})
    ckpt.wait()
  finally:
    ckpt.close()
  return step


def export_workdir(workdir: str, out_dir: str, step: int | None = None, arch: str | None = None,
                   mesh=None, source_config: bool = True, **kwargs) -> list[str]:
  """lmjax workdir checkpoint (latest, or `step`) -> HF model dir (hf.save_hf), with the
  run's tokenizer files when it has one (its meta's, else where its config points).
  A run that started from an HF model (imported, or through init_from, however many runs
  back) gets the source's config.json and generation_config.json, recorded in its
  checkpoint meta (see save_hf's hf_config); `source_config=False` makes them from the
  model config and tokenizer instead. A reward model (model.head='score') is written as
  *ForSequenceClassification. kwargs go to `hf.save_hf`."""
  params, cfg, meta, _ = load_params(workdir, step, mesh)
  tok = kwargs.pop('tokenizer_path', None)
  if tok is None:
    for path in (meta.get('tokenizer'), tokenizer_lib.resolve_path(cfg)):
      if path and os.path.exists(path):
        tok = path
        break
  if source_config:
    kwargs.setdefault('hf_config', meta.get('hf_config'))
    kwargs.setdefault('generation_config', meta.get('hf_generation_config'))
  return hf.save_hf(params, cfg, out_dir, arch=arch, tokenizer_path=tok, **kwargs)
