"""Train state: a pure pytree {'step', 'params', 'opt_state'}, created already sharded.

Params are a plain nested dict of arrays (`nnx.to_pure_dict`); the model's graph
definition is static and rebuilt from the config, so checkpoints hold only arrays.

With cfg.lora.enabled the state is {'step', 'params', 'adapters', 'opt_state'}: the
params are the frozen base (in lora.base_dtype), the optimizer state covers the adapters
only, and a checkpoint holds everything but the params (`Setup.saved`): the base is
re-read from the run's init_from, recorded in the checkpoint's meta.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from lmjax import sharding
from lmjax.models import lora as lora_lib
from lmjax.models import transformer


def model_config(cfg) -> ml_collections.FrozenConfigDict:
  return ml_collections.FrozenConfigDict(cfg.model)


def lr_schedule(cfg) -> optax.Schedule:
  o, steps = cfg.optim, cfg.train.steps
  warmup = min(o.warmup_steps, steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices (projections, embeddings), not on norm scales or biases."""
  def leaf_mask(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    return not (name.endswith('bias') or name == 'scale')
  return jax.tree_util.tree_map_with_path(leaf_mask, params)


class GuardState(NamedTuple):
  inner: Any
  grad_norm_ema: jax.Array   # running mean of accepted steps' gradient norms (0: none yet)
  skipped: jax.Array         # steps skipped so far
  consecutive: jax.Array     # steps skipped in a row, up to the last one


def skip_bad_steps(inner: optax.GradientTransformation, spike_threshold: float = 0.0,
                   ema_decay: float = 0.99) -> optax.GradientTransformation:
  """`inner`, except that a step whose gradients are not finite, or (spike_threshold > 0)
  whose global gradient norm exceeds spike_threshold x the running mean of the accepted
  steps' norms, changes nothing: zero updates, inner state kept (as optax.apply_if_finite
  does for non-finite gradients, plus the spike test). Counts in GuardState."""

  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return GuardState(inner.init(params), jnp.zeros((), jnp.float32), zero, zero)

  def update(grads, state, params=None):
    norm = optax.tree.norm(grads)
    bad = ~jnp.isfinite(norm)
    if spike_threshold > 0:
      bad |= (state.grad_norm_ema > 0) & (norm > spike_threshold * state.grad_norm_ema)
    updates, inner_state = inner.update(grads, state.inner, params)
    keep = lambda new, old: jnp.where(bad, old, new)
    updates = jax.tree.map(lambda u: jnp.where(bad, jnp.zeros_like(u), u), updates)
    ema = jnp.where(state.grad_norm_ema > 0,
                    ema_decay * state.grad_norm_ema + (1 - ema_decay) * norm, norm)
    return updates, GuardState(
        jax.tree.map(keep, inner_state, state.inner), keep(ema, state.grad_norm_ema),
        state.skipped + bad.astype(jnp.int32),
        jnp.where(bad, state.consecutive + 1, 0).astype(jnp.int32))

  return optax.GradientTransformation(init, update)


def guarded(cfg) -> bool:
  return bool(cfg.train.skip_bad_steps)


def optimizer(cfg) -> optax.GradientTransformation:
  o = cfg.optim
  parts = []
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts.append(optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=_decay_mask))
  tx = optax.chain(*parts)
  if guarded(cfg):
    tx = skip_bad_steps(tx, cfg.train.spike_threshold)
  return tx


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the step and loop need besides the state: static model graph, shardings."""
  graphdef: Any
  tx: optax.GradientTransformation
  mesh: Mesh
  rules: dict
  state_shardings: Any
  abstract_state: Any        # ShapeDtypeStructs with shardings (for restore).
  n_params: int              # the model's parameters
  n_trainable: int           # what the optimizer updates (= n_params without LoRA)
  lora: Any = None           # cfg.lora (frozen) when adapters train, else None
  reference: bool = False    # DPO 'copy': state['ref_params'], a frozen copy of the params

  @property
  def trainable(self) -> str:
    """The state entry the optimizer updates: 'adapters' (LoRA) or 'params'."""
    return 'adapters' if self.lora is not None else 'params'

  def saved(self, state: dict) -> dict:
    """The part of `state` a checkpoint holds: all of it, or with LoRA all but the
    frozen base params (small, adapter-only checkpoints)."""
    return {k: v for k, v in state.items()
            if k != 'ref_params' and (k != 'params' or self.lora is None)}

  @property
  def abstract_saved(self) -> dict:
    return self.saved(self.abstract_state)

  def weights(self, state: dict) -> dict:
    """What a forward pass needs: {'params'} or {'params', 'adapters'} (and DPO's
    'ref_params' when it keeps a copy)."""
    return {k: state[k] for k in ('params', 'adapters', 'ref_params') if k in state}

  @property
  def weight_shardings(self) -> dict:
    return self.weights(self.state_shardings)


def logical_param_specs(cfg):
  graphdef, abstract = transformer.abstract(model_config(cfg))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  shapes = nnx.to_pure_dict(abstract)
  return graphdef, specs, shapes


def _base_dtype(cfg, shapes):
  """With LoRA, the frozen params' ShapeDtypeStructs in lora.base_dtype."""
  dt = transformer.DTYPES[cfg.lora.base_dtype]
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, shapes)


def make_setup(cfg, mesh: Mesh) -> Setup:
  rules = dict(cfg.rules)
  graphdef, specs, shapes = logical_param_specs(cfg)
  param_sh = sharding.tree_shardings(specs, shapes, mesh, rules)
  n_params = transformer.count_params(shapes)
  tx = optimizer(cfg)
  state_sh = {'step': sharding.replicated(mesh), 'params': param_sh}
  abstract_state = {'step': jax.ShapeDtypeStruct((), jnp.int32)}
  lora = None
  if cfg.lora.enabled:
    lora = ml_collections.FrozenConfigDict(cfg.lora)
    abstract_state['params'] = _base_dtype(cfg, shapes)
    trainable, trainable_sh = lora_lib.shapes(cfg), lora_lib.shardings(cfg, mesh, rules)
    abstract_state['adapters'] = trainable
    state_sh['adapters'] = trainable_sh
  else:
    abstract_state['params'] = trainable = shapes
    trainable_sh = param_sh
  abstract_opt = jax.eval_shape(tx.init, trainable)
  state_sh['opt_state'] = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, trainable_sh,
      transform_non_params=lambda _: sharding.replicated(mesh))
  abstract_state['opt_state'] = abstract_opt
  reference = _ref_mode(cfg) == 'copy'
  if reference:
    abstract_state['ref_params'] = abstract_state['params']
    state_sh['ref_params'] = param_sh
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sh)
  return Setup(graphdef=graphdef, tx=tx, mesh=mesh, rules=rules,
               state_shardings=state_sh, abstract_state=abstract_state,
               n_params=n_params, n_trainable=transformer.count_params(trainable), lora=lora,
               reference=reference)


def _ref_mode(cfg) -> str | None:
  from lmjax.train import step  # pylint: disable=import-outside-toplevel
  return step.reference_mode(cfg)


def adapter_key(cfg):
  """The key fresh LoRA adapters are drawn from (distinct from the params' init key)."""
  return jax.random.fold_in(jax.random.key(cfg.seed), 1)


def init_state(cfg, setup: Setup, params: Any | None = None) -> dict:
  """Fresh state, created directly with its shardings (no full copy on one device).

  params: start from these (e.g. another run's, placed with setup's param shardings;
  donated) instead of a random init; the optimizer state is fresh and step 0 either way.
  With LoRA the params become the frozen base (cast to lora.base_dtype) and fresh
  adapters (B = 0: the model computes what the base does) are what the optimizer updates.
  """
  mcfg = model_config(cfg)
  init_adapters = lora_lib.init_fn(cfg) if setup.lora is not None else None

  def init(key):
    with nnx.use_eager_sharding(False):
      model = transformer.Transformer(mcfg, nnx.Rngs(params=key))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return fresh(p)

  def fresh(p):
    state = {'step': jnp.zeros((), jnp.int32)}
    if init_adapters is None:
      state.update(params=p, opt_state=setup.tx.init(p))
    else:
      adapters = init_adapters(adapter_key(cfg), p)
      state.update(params=lora_lib.base_params(p, cfg), adapters=adapters,
                   opt_state=setup.tx.init(adapters))
    if setup.reference:  # DPO's frozen reference: the starting params
      state['ref_params'] = jax.tree.map(jnp.copy, state['params'])
    return state

  with sharding.use_mesh(setup.mesh, setup.rules):
    if params is None:
      return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.key(cfg.seed))
    return jax.jit(fresh, in_shardings=(setup.state_shardings['params'],),
                   out_shardings=setup.state_shardings, donate_argnums=(0,))(params)

