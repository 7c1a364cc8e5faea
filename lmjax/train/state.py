"""Train state: a pure pytree {'step', 'params', 'opt_state'}, created already sharded.

Params are a plain nested dict of arrays (`nnx.to_pure_dict`); the model's graph
definition is static and rebuilt from the config, so checkpoints hold only arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from lmjax import sharding
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


def optimizer(cfg) -> optax.GradientTransformation:
  o = cfg.optim
  parts = []
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts.append(optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the step and loop need besides the state: static model graph, shardings."""
  graphdef: Any
  tx: optax.GradientTransformation
  mesh: Mesh
  rules: dict
  state_shardings: Any
  abstract_state: Any        # ShapeDtypeStructs with shardings (for restore).
  n_params: int


def logical_param_specs(cfg):
  graphdef, abstract = transformer.abstract(model_config(cfg))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  shapes = nnx.to_pure_dict(abstract)
  return graphdef, specs, shapes


def make_setup(cfg, mesh: Mesh) -> Setup:
  rules = dict(cfg.rules)
  graphdef, specs, shapes = logical_param_specs(cfg)
  param_sh = sharding.tree_shardings(specs, shapes, mesh, rules)
  tx = optimizer(cfg)
  abstract_opt = jax.eval_shape(tx.init, shapes)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_sh,
      transform_non_params=lambda _: sharding.replicated(mesh))
  state_sh = {'step': sharding.replicated(mesh), 'params': param_sh, 'opt_state': opt_sh}
  abstract_state = {'step': jax.ShapeDtypeStruct((), jnp.int32),
                    'params': shapes, 'opt_state': abstract_opt}
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sh)
  return Setup(graphdef=graphdef, tx=tx, mesh=mesh, rules=rules,
               state_shardings=state_sh, abstract_state=abstract_state,
               n_params=transformer.count_params(shapes))


def init_state(cfg, setup: Setup, params: Any | None = None) -> dict:
  """Fresh state, created directly with its shardings (no full copy on one device).

  params: start from these (e.g. another run's, placed with setup's param shardings;
  donated) instead of a random init; the optimizer state is fresh and step 0 either way.
  """
  mcfg = model_config(cfg)

  def init(key):
    with nnx.use_eager_sharding(False):
      model = transformer.Transformer(mcfg, nnx.Rngs(params=key))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return fresh(p)

  def fresh(p):
    return {'step': jnp.zeros((), jnp.int32), 'params': p, 'opt_state': setup.tx.init(p)}

  with sharding.use_mesh(setup.mesh, setup.rules):
    if params is None:
      return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.key(cfg.seed))
    return jax.jit(fresh, in_shardings=(setup.state_shardings['params'],),
                   out_shardings=setup.state_shardings, donate_argnums=(0,))(params)
