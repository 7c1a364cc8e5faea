"""The jitted, donated train step and the eval step.

A batch is a dict of [global_batch, seq_len] arrays: inputs, targets, segment_ids,
positions, loss_mask. The loss is averaged over every loss token of the global batch,
also under gradient accumulation (micro-batch gradients of token *sums* are added,
then divided once by the global token count).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmjax import sharding
from lmjax.train import losses
from lmjax.train.state import Setup, lr_schedule


def model_logits(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  return model(batch['inputs'], batch['positions'], batch['segment_ids'])


def loss_sums(graphdef, params, batch, z_loss):
  """(nll, z-loss) summed over the batch's loss tokens."""
  logits = model_logits(graphdef, params, batch)
  return losses.next_token(logits, batch['targets'], batch['loss_mask'], z_loss)


def make_train_step(cfg, setup: Setup) -> Callable:
  graphdef, tx = setup.graphdef, setup.tx
  accum, z_coef = cfg.train.grad_accum, cfg.train.z_loss
  schedule = lr_schedule(cfg)

  def objective(params, batch, n_tokens):
    nll, z = loss_sums(graphdef, params, batch, z_coef)
    return (nll + z) / n_tokens, (nll, z)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def step(state, batch):
    params = state['params']
    n_tokens = jnp.maximum(jnp.sum(batch['loss_mask'].astype(jnp.float32)), 1.0)
    if accum == 1:
      (_, (nll, z)), grads = grad_fn(params, batch, n_tokens)
    else:
      def split(x):
        x = x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
        return sharding.constrain(x, (None, 'batch', 'length'))
      micro = jax.tree.map(split, batch)

      def body(carry, mb):
        g_acc, nll_acc, z_acc = carry
        (_, (nll, z)), g = grad_fn(params, mb, n_tokens)
        return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, z_acc + z), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, nll, z), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        'loss': nll / n_tokens,
        'z_loss': z / n_tokens,
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(new_params),
        'lr': schedule(state['step']),
        'loss_tokens': n_tokens,
    }
    new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state}
    return new_state, metrics

  batch_sh = sharding.batch_sharding(setup.mesh, setup.rules)
  jitted = jax.jit(step, in_shardings=(setup.state_shardings, batch_sh),
                   out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=(0,))

  def run(state, batch):
    with sharding.use_mesh(setup.mesh, setup.rules):
      return jitted(state, batch)

  run.jitted = jitted
  return run


def make_eval_step(cfg, setup: Setup) -> Callable:
  graphdef = setup.graphdef

  def step(params, batch):
    nll, _ = loss_sums(graphdef, params, batch, 0.0)
    return nll, jnp.sum(batch['loss_mask'].astype(jnp.float32))

  batch_sh = sharding.batch_sharding(setup.mesh, setup.rules)
  jitted = jax.jit(step, in_shardings=(setup.state_shardings['params'], batch_sh),
                   out_shardings=sharding.replicated(setup.mesh))

  def run(params, batch):
    with sharding.use_mesh(setup.mesh, setup.rules):
      return jitted(params, batch)

  return run
