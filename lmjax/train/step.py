"""The jitted, donated train step, the eval step and the LoRA merge.

A batch is a dict of [rows, seq_len] arrays (inputs, targets, segment_ids, positions,
loss_mask) plus the objective's per-row arrays. The objective (setup.objective, train/
objectives) gives the loss sums and their normaliser: the loss is averaged over every loss
token of the global batch (or every pair), also under gradient accumulation (micro-batch
gradients of *sums* are added, then divided once by the global count).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lmjax import sharding
from lmjax.models import lora as lora_lib
from lmjax.train import forward, objectives
from lmjax.train import state as state_lib
from lmjax.train.forward import check_host_batch, loss_sums, model_stats  # noqa: F401
from lmjax.train.state import Setup, lr_schedule


def dropout_key(cfg, step):
  """LoRA dropout's key at `step` (None when lora.dropout is 0: deterministic)."""
  if not cfg.lora.enabled or cfg.lora.dropout == 0:
    return None
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 2), step)


def make_train_step(cfg, setup: Setup, telemetry: bool | None = None) -> Callable:
  """The optimizer updates setup.get_trainable(state): the params, or with LoRA the
  adapters (gradients are taken w.r.t. the adapters only; the base params are a
  constant), and any trainable entry the objective adds.

  The loss is the objective's sums divided by its normaliser over the global batch
  (loss tokens, or pairs). Under gradient accumulation micro-batch gradients of *sums* are
  added, then divided once. An objective with updates_per_step > 1 (GRPO's μ) makes that
  many optimizer updates on the step's batch; the step counter advances by one.

  telemetry (default cfg.train.telemetry): the step also returns the stability statistics
  (per-layer gradient and update norms; an LM objective's forward-pass ones).
  """
  tx, obj = setup.tx, setup.objective
  accum = cfg.train.grad_accum
  schedule = lr_schedule(cfg)
  telemetry = bool(cfg.train.telemetry if telemetry is None else telemetry)
  sums = (obj.sums(setup, telemetry=True) if telemetry and obj.forward_telemetry
          else obj.sums(setup))

  def loss_fn(trainable, state, batch, denom, rng):
    total, aux = sums(setup.with_trainable(state, trainable), batch, rng)
    return total / denom, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  iterations = obj.updates_per_step

  def update(state, batch, rng):
    """One optimizer update on `batch`: (the state with new trainable entries and
    optimizer state, its metrics)."""
    trainable = setup.get_trainable(state)
    denom = obj.denominator(batch)
    if accum == 1:
      (_, aux), grads = grad_fn(trainable, state, batch, denom, rng)
    else:
      def split(x):
        x = x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
        return sharding.constrain(x, (None, 'batch') + ('length',) * (x.ndim - 2))
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        mb, i = xs
        g_acc, aux_acc = carry
        mrng = None if rng is None else jax.random.fold_in(rng, i)
        (_, aux), g = grad_fn(trainable, state, mb, denom, mrng)
        return (jax.tree.map(jnp.add, g_acc, g), obj.combine(aux_acc, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      aux0 = obj.init_aux(jax.eval_shape(lambda: sums(setup.weights(state),
                                                      jax.tree.map(lambda x: x[0], micro),
                                                      rng)[1]))
      (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), (micro, jnp.arange(accum)))
    updates, opt_state = tx.update(grads, state['opt_state'], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    metrics = obj.metrics(aux, denom)
    if isinstance(opt_state, state_lib.GuardState):  # train.skip_bad_steps
      metrics.update(skipped=opt_state.consecutive > 0, skipped_steps=opt_state.skipped,
                     skipped_in_a_row=opt_state.consecutive)
    metrics.update({
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(new_trainable),  # of what trains (adapters w/ LoRA)
    })
    metrics[obj.normaliser] = denom
    if telemetry:  # per layer: the gradient (before clipping) and the applied update
      metrics.update(layer_norms(grads, 'grad_norm'))
      metrics.update(layer_norms(updates, 'update_norm'))
    return dict(setup.put_trainable(state, new_trainable), opt_state=opt_state), metrics

  def step(state, batch):
    rng = dropout_key(cfg, state['step'])
    if iterations == 1:
      new_state, metrics = update(state, batch, rng)
    else:  # the objective's updates on one batch (GRPO's μ): metrics averaged over them
      def body(s, i):
        return update(s, batch, None if rng is None else jax.random.fold_in(rng, i))
      new_state, stacked = jax.lax.scan(body, state, jnp.arange(iterations))
      last = ('skipped', 'skipped_steps', 'skipped_in_a_row')
      metrics = {k: v[-1] if k in last else jnp.mean(v.astype(jnp.float32), axis=0)
                 for k, v in stacked.items()}
    metrics['lr'] = schedule(state['step'])
    return dict(new_state, step=state['step'] + 1), metrics

  batch_sh = forward.batch_shardings(setup.mesh, setup.rules, obj.batch_spec(1))
  jitted = jax.jit(step, in_shardings=(setup.state_shardings, batch_sh),
                   out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=(0,))

  def run(state, batch):
    with sharding.use_mesh(setup.mesh, setup.rules):
      return jitted(state, batch)

  run.jitted = jitted
  return run


def _layers_subtree(tree):
  """The 'layers' entry of a params-shaped tree (params, LoRA adapters, or a dict of
  trainable entries holding one), or None."""
  if isinstance(tree, dict):
    if 'layers' in tree:
      return tree['layers']
    for v in tree.values():
      found = _layers_subtree(v)
      if found is not None:
        return found
  return None


def layer_norms(tree, name: str) -> dict:
  """{'stability/layer<i>/<name>': the L2 norm of layer i's part} of a params-shaped tree
  (gradients, updates) whose 'layers' leaves are stacked [layers, ...]; {} without one."""
  layers = _layers_subtree(tree)
  leaves = jax.tree.leaves(layers) if layers is not None else []
  if not leaves:
    return {}
  sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
           for x in leaves)
  norms = jnp.sqrt(sq)
  return {f'stability/layer{i}/{name}': norms[i] for i in range(norms.shape[0])}


def batch_spec(cfg, mesh, rows: int, objective=None) -> dict:
  """ShapeDtypeStructs (with shardings) of a global batch of `rows` rows of the
  objective's (default objectives.get(cfg)): what the train step is compiled for."""
  obj = objectives.get(cfg) if objective is None else objective
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(
      mesh, cfg.rules, len(shape))) for k, (shape, dtype) in obj.batch_spec(rows).items()}


def make_merge(setup: Setup) -> Callable:
  """weights -> params with the adapters merged (W + s·A@B), sharded like the params: what
  generation runs on. Without LoRA the params themselves."""
  if setup.lora is None:
    return lambda weights: weights['params']
  lcfg = setup.lora
  jitted = jax.jit(lambda w: lora_lib.merge(w['params'], w['adapters'], lcfg),
                   in_shardings=(setup.weight_shardings,),
                   out_shardings=setup.state_shardings['params'])

  def run(weights):
    with sharding.use_mesh(setup.mesh, setup.rules):
      return jitted(weights)

  return run
