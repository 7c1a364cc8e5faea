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
from lmjax.models import lora as lora_lib
from lmjax.train import losses
from lmjax.train.state import Setup, lr_schedule


def model_logits(graphdef, params, batch, *, adapters=None, lora=None, dropout_rng=None):
  model = nnx.merge(graphdef, params)
  return model(batch['inputs'], batch['positions'], batch['segment_ids'], adapters=adapters,
               lora=lora, dropout_rng=dropout_rng)


def loss_sums(graphdef, params, batch, z_loss, *, adapters=None, lora=None, dropout_rng=None):
  """(nll, z-loss) summed over the batch's loss tokens (LoRA adapters unmerged if given)."""
  params = lora_lib.effective_params(params, adapters)
  logits = model_logits(graphdef, params, batch, adapters=adapters, lora=lora,
                        dropout_rng=dropout_rng)
  return losses.next_token(logits, batch['targets'], batch['loss_mask'], z_loss)


def dropout_key(cfg, step):
  """LoRA dropout's key at `step` (None when lora.dropout is 0: deterministic)."""
  if not cfg.lora.enabled or cfg.lora.dropout == 0:
    return None
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 2), step)


def make_train_step(cfg, setup: Setup) -> Callable:
  """The optimizer updates state[setup.trainable]: the params, or with LoRA the adapters
  (gradients are taken w.r.t. the adapters only; the base params are a constant)."""
  graphdef, tx, lora = setup.graphdef, setup.tx, setup.lora
  accum, z_coef = cfg.train.grad_accum, cfg.train.z_loss
  schedule = lr_schedule(cfg)

  def objective(trainable, frozen, batch, n_tokens, rng):
    if lora is None:
      nll, z = loss_sums(graphdef, trainable, batch, z_coef)
    else:
      nll, z = loss_sums(graphdef, frozen, batch, z_coef, adapters=trainable, lora=lora,
                         dropout_rng=rng)
    return (nll + z) / n_tokens, (nll, z)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def step(state, batch):
    trainable = state[setup.trainable]
    frozen = state['params'] if lora is not None else None
    rng = dropout_key(cfg, state['step'])
    n_tokens = jnp.maximum(jnp.sum(batch['loss_mask'].astype(jnp.float32)), 1.0)
    if accum == 1:
      (_, (nll, z)), grads = grad_fn(trainable, frozen, batch, n_tokens, rng)
    else:
      def split(x):
        x = x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
        return sharding.constrain(x, (None, 'batch', 'length'))
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        mb, i = xs
        g_acc, nll_acc, z_acc = carry
        mrng = None if rng is None else jax.random.fold_in(rng, i)
        (_, (nll, z)), g = grad_fn(trainable, frozen, mb, n_tokens, mrng)
        return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, z_acc + z), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, nll, z), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, jnp.arange(accum)))
    updates, opt_state = tx.update(grads, state['opt_state'], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    metrics = {
        'loss': nll / n_tokens,
        'z_loss': z / n_tokens,
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(new_trainable),  # of what trains (adapters w/ LoRA)
        'lr': schedule(state['step']),
        'loss_tokens': n_tokens,
    }
    new_state = dict(state, step=state['step'] + 1, opt_state=opt_state)
    new_state[setup.trainable] = new_trainable
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
  """(weights, batch) -> (nll sum, loss tokens); weights = setup.weights(state)."""
  del cfg
  graphdef, lora = setup.graphdef, setup.lora

  def step(weights, batch):
    nll, _ = loss_sums(graphdef, weights['params'], batch, 0.0,
                       adapters=weights.get('adapters'), lora=lora)
    return nll, jnp.sum(batch['loss_mask'].astype(jnp.float32))

  batch_sh = sharding.batch_sharding(setup.mesh, setup.rules)
  jitted = jax.jit(step, in_shardings=(setup.weight_shardings, batch_sh),
                   out_shardings=sharding.replicated(setup.mesh))

  def run(weights, batch):
    with sharding.use_mesh(setup.mesh, setup.rules):
      return jitted(weights, batch)

  return run


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
