"""Train state: a pure pytree {'step', 'params', 'opt_state'}, created already sharded.

Params are a plain nested dict of arrays (`nnx.to_pure_dict`); the model's graph
definition is static and rebuilt from the config, so checkpoints hold only arrays.

The objective (train/objectives) may add entries, frozen (DPO's reference copy,
'ref_params') or trained with the model (an extra head); Setup.extra. A reward model's
score head is one of the params (model.head='score').

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
from lmjax.train import objectives


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


def optimizer(cfg, updates_per_step: int = 1) -> optax.GradientTransformation:
  """AdamW on lr_schedule(cfg), which counts train steps: with several optimizer updates
  per step (an objective's updates_per_step) they share their step's learning rate."""
  o = cfg.optim
  parts = []
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  schedule = lr_schedule(cfg)
  if updates_per_step > 1:
    schedule = lambda count, base=schedule: base(count // updates_per_step)
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=_decay_mask))
  tx = optax.chain(*parts)
  if guarded(cfg):
    tx = skip_bad_steps(tx, cfg.train.spike_threshold)
  return tx


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the step and loop need besides the state: static model graph, shardings, the
  objective (train/objectives) and the state entries it adds (`extra`)."""
  graphdef: Any
  tx: optax.GradientTransformation
  mesh: Mesh
  rules: dict
  state_shardings: Any
  abstract_state: Any        # ShapeDtypeStructs with shardings (for restore).
  n_params: int              # the model's parameters
  n_trainable: int           # what the optimizer updates (= n_params without LoRA)
  objective: Any = None      # the run's objectives.Objective
  lora: Any = None           # cfg.lora (frozen) when adapters train, else None
  extra: dict = dataclasses.field(default_factory=dict)  # name -> objectives.StateEntry

  @property
  def trainable(self) -> str:
    """The model's state entry the optimizer updates: 'adapters' (LoRA) or 'params'."""
    return 'adapters' if self.lora is not None else 'params'

  @property
  def trainable_keys(self) -> tuple[str, ...]:
    """Every state entry the optimizer updates: the model's, then the objective's."""
    return (self.trainable,) + tuple(k for k, e in self.extra.items() if e.trainable)

  def get_trainable(self, state: dict):
    """What the optimizer updates: state[trainable] alone, or a dict of the entries when
    the objective adds trainable ones."""
    keys = self.trainable_keys
    return state[keys[0]] if len(keys) == 1 else {k: state[k] for k in keys}

  def put_trainable(self, state: dict, trainable) -> dict:
    """`state` with its trainable entries replaced by `trainable` (get_trainable's form)."""
    keys = self.trainable_keys
    return dict(state, **({keys[0]: trainable} if len(keys) == 1 else trainable))

  def with_trainable(self, state: dict, trainable) -> dict:
    """weights(state) with the trainable entries taken from `trainable`: what a forward
    pass differentiated with respect to them uses."""
    return self.weights(self.put_trainable(state, trainable))

  @property
  def needs_base(self) -> bool:
    """Whether a resumed run reloads the base model it started from (init_from): LoRA's
    frozen params, or an objective's state that depends on it (DPO's reference)."""
    return self.lora is not None or bool(getattr(self.objective, 'needs_base', False))

  def unsaved(self) -> tuple[str, ...]:
    """The state entries checkpoints leave out, rebuilt from the base model on resume:
    LoRA's frozen params, and the objective's unsaved entries."""
    keys = ('params',) if self.lora is not None else ()
    return keys + tuple(k for k, e in self.extra.items() if not e.saved)

  def saved(self, state: dict) -> dict:
    """The part of `state` a checkpoint holds: all of it but `unsaved()` (with LoRA,
    small adapter-only checkpoints)."""
    skip = self.unsaved()
    return {k: v for k, v in state.items() if k not in skip}

  @property
  def abstract_saved(self) -> dict:
    return self.saved(self.abstract_state)

  def weights(self, state: dict) -> dict:
    """What a forward pass needs: {'params'}, with LoRA 'adapters', and the objective's
    entries (e.g. DPO's 'ref_params')."""
    return {k: state[k] for k in ('params', 'adapters', *self.extra) if k in state}

  @property
  def weight_shardings(self) -> dict:
    return self.weights(self.state_shardings)

  def rebuild(self, state: dict, load_base) -> dict:
    """A restored `state` completed with the unsaved entries: load_base() (the base
    params, sharded like state['params']; called once per entry, so no two entries share
    buffers) as LoRA's frozen params, and each unsaved objective entry's init of it."""
    state = dict(state)
    if self.lora is not None:
      state['params'] = load_base()
    for i, (name, e) in enumerate(self.extra.items()):
      if not e.saved:
        with sharding.use_mesh(self.mesh, self.rules):
          state[name] = jax.jit(e.init, out_shardings=e.shardings, donate_argnums=(0,))(
              load_base(), entry_key(self.objective.cfg.seed, i))
    return state


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


def make_setup(cfg, mesh: Mesh, objective=None) -> Setup:
  """The run's Setup; objective: the run's (default objectives.get(cfg))."""
  objective = objectives.get(cfg) if objective is None else objective
  rules = dict(cfg.rules)
  graphdef, specs, shapes = logical_param_specs(cfg)
  param_sh = sharding.tree_shardings(specs, shapes, mesh, rules)
  n_params = transformer.count_params(shapes)
  tx = optimizer(cfg, objective.updates_per_step)
  state_sh = {'step': sharding.replicated(mesh), 'params': param_sh}
  abstract_state = {'step': jax.ShapeDtypeStruct((), jnp.int32)}
  lora = None
  if cfg.lora.enabled:
    lora = ml_collections.FrozenConfigDict(cfg.lora)
    abstract_state['params'] = _base_dtype(cfg, shapes)
    abstract_state['adapters'] = lora_lib.shapes(cfg)
    state_sh['adapters'] = lora_lib.shardings(cfg, mesh, rules)
  else:
    abstract_state['params'] = shapes
  extra = objective.state_entries(abstract_state['params'], param_sh)
  for name, e in extra.items():
    abstract_state[name], state_sh[name] = e.abstract, e.shardings
  setup = Setup(graphdef=graphdef, tx=tx, mesh=mesh, rules=rules, state_shardings=state_sh,
                abstract_state=None, n_params=n_params, n_trainable=0, objective=objective,
                lora=lora, extra=extra)
  trainable, trainable_sh = setup.get_trainable(abstract_state), setup.get_trainable(state_sh)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  state_sh['opt_state'] = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, trainable_sh,
      transform_non_params=lambda _: sharding.replicated(mesh))
  abstract_state['opt_state'] = abstract_opt
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sh)
  return dataclasses.replace(setup, abstract_state=abstract_state,
                             n_trainable=transformer.count_params(trainable))


def entry_key(seed: int, index: int):
  """The key an objective's state entry `index` is initialised from."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), index)


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
      state['params'] = p
    else:
      state['adapters'] = init_adapters(adapter_key(cfg), p)
      state['params'] = lora_lib.base_params(p, cfg)
    for i, (name, e) in enumerate(setup.extra.items()):  # e.g. DPO's frozen reference
      state[name] = e.init(state['params'], entry_key(cfg.seed, i))
    state['opt_state'] = setup.tx.init(setup.get_trainable(state))
    return state

  with sharding.use_mesh(setup.mesh, setup.rules):
    if params is None:
      return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.key(cfg.seed))
    return jax.jit(fresh, in_shardings=(setup.state_shardings['params'],),
                   out_shardings=setup.state_shardings, donate_argnums=(0,))(params)

