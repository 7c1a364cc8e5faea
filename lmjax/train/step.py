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
from lmjax.models import attention as attn_lib
from lmjax.models import lora as lora_lib
from lmjax.train import losses
from lmjax.train import state as state_lib
from lmjax.train.state import Setup, lr_schedule


def model_stats(graphdef, params, batch, *, adapters=None, lora=None, dropout_rng=None):
  """(logsumexp, target logit) [B, T] of the model's logits for the batch (losses.
  logit_stats), computed model.loss_chunk positions at a time when set."""
  model = nnx.merge(graphdef, params)
  h = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'],
                   adapters=adapters, lora=lora, dropout_rng=dropout_rng)
  unembed = lambda x: sharding.constrain(model.unembed(x), ('batch', 'length', 'vocab'))
  return losses.chunked_logit_stats(h, unembed, batch['targets'], model.cfg.loss_chunk)


def loss_sums(graphdef, params, batch, z_loss, *, adapters=None, lora=None, dropout_rng=None):
  """(nll, z-loss) summed over the batch's loss tokens (LoRA adapters unmerged if given)."""
  params = lora_lib.effective_params(params, adapters)
  stats = model_stats(graphdef, params, batch, adapters=adapters, lora=lora,
                      dropout_rng=dropout_rng)
  return losses.nll_sums(*stats, batch['loss_mask'], z_loss)


def dropout_key(cfg, step):
  """LoRA dropout's key at `step` (None when lora.dropout is 0: deterministic)."""
  if not cfg.lora.enabled or cfg.lora.dropout == 0:
    return None
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 2), step)


def reference_mode(cfg) -> str | None:
  """The DPO reference: 'adapters_off' (LoRA: the base, same step, no second copy),
  'copy' (a frozen copy of the starting params, sharded like them) or 'precomputed'
  (reference log-probs stored with the data, batch['ref_logps']); None when the run has
  none (not DPO, or dpo.reference_free)."""
  if cfg.stage != 'dpo' or cfg.dpo.reference_free:
    return None
  mode = cfg.dpo.reference
  if mode == 'auto':
    return 'adapters_off' if cfg.lora.enabled else 'copy'
  return mode


def _weights(setup, trainable, state):
  """(params, adapters) a forward pass uses: the trainable entry in its place."""
  if setup.lora is None:
    return trainable, None
  return state['params'], trainable


def lm_sums(cfg, setup):
  """Next-token loss: (nll + z sums, {'loss', 'z_loss'} sums); normalised by loss tokens."""
  graphdef, lora, z_coef = setup.graphdef, setup.lora, cfg.train.z_loss

  def sums(trainable, state, batch, rng):
    params, adapters = _weights(setup, trainable, state)
    nll, z = loss_sums(graphdef, params, batch, z_coef, adapters=adapters, lora=lora,
                       dropout_rng=rng)
    return nll + z, {'loss': nll, 'z_loss': z}

  return sums


def pair_logps(graphdef, params, batch, *, adapters=None, lora=None, dropout_rng=None):
  """Completion log-prob sums and token counts of a pair batch ([2B] rows -> [B] each):
  (chosen, rejected, chosen tokens, rejected tokens), one stacked forward pass."""
  params = lora_lib.effective_params(params, adapters)
  stats = model_stats(graphdef, params, batch, adapters=adapters, lora=lora,
                      dropout_rng=dropout_rng)
  lp, n = losses.sequence_sums(*stats, batch['loss_mask'])
  return (*losses.split_pairs(lp), *losses.split_pairs(n))


def dpo_sums(cfg, setup):
  """DPO (cfg.dpo): (sum of per-pair losses, sums of TRL's metrics); normalised by pairs."""
  graphdef, lora, d = setup.graphdef, setup.lora, cfg.dpo
  mode = reference_mode(cfg)

  def sums(trainable, state, batch, rng):
    params, adapters = _weights(setup, trainable, state)
    pc, pr, nc, nr = pair_logps(graphdef, params, batch, adapters=adapters, lora=lora,
                                dropout_rng=rng)
    if mode is None:  # dpo.reference_free: a reference of log-prob 0
      rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
    elif mode == 'precomputed':
      rc, rr = losses.split_pairs(batch['ref_logps'])
    else:
      ref_params = state['params'] if mode == 'adapters_off' else state['ref_params']
      rc, rr, _, _ = jax.lax.stop_gradient(pair_logps(graphdef, ref_params, batch))
    loss, m = losses.dpo(pc, pr, rc, rr, loss_type=d.loss_type, beta=d.beta,
                         label_smoothing=d.label_smoothing, reference_free=d.reference_free,
                         chosen_tokens=nc, rejected_tokens=nr, rpo_alpha=d.rpo_alpha)
    out = {'loss': jnp.sum(loss), 'logps/chosen': jnp.sum(pc), 'logps/rejected': jnp.sum(pr)}
    out.update((k, jnp.sum(v)) for k, v in m.items())
    return jnp.sum(loss), out

  return sums


def make_train_step(cfg, setup: Setup) -> Callable:
  """The optimizer updates state[setup.trainable]: the params, or with LoRA the adapters
  (gradients are taken w.r.t. the adapters only; the base params are a constant).

  The objective is the stage's: next-token loss averaged over every loss token of the
  global batch (pretrain, sft), or the DPO loss averaged over its pairs (dpo). Under
  gradient accumulation micro-batch gradients of *sums* are added, then divided once.
  """
  tx, lora = setup.tx, setup.lora
  accum = cfg.train.grad_accum
  schedule = lr_schedule(cfg)
  dpo = cfg.stage == 'dpo'
  sums = dpo_sums(cfg, setup) if dpo else lm_sums(cfg, setup)

  def objective(trainable, state, batch, denom, rng):
    total, aux = sums(trainable, state, batch, rng)
    return total / denom, aux

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def step(state, batch):
    trainable = state[setup.trainable]
    rng = dropout_key(cfg, state['step'])
    if dpo:
      denom = jnp.float32(batch['inputs'].shape[0] // 2)  # pairs in the global batch
    else:
      denom = jnp.maximum(jnp.sum(batch['loss_mask'].astype(jnp.float32)), 1.0)
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
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, aux_acc, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                          jax.eval_shape(lambda: sums(trainable, state,
                                                      jax.tree.map(lambda x: x[0], micro),
                                                      rng)[1]))
      (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), (micro, jnp.arange(accum)))
    updates, opt_state = tx.update(grads, state['opt_state'], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    metrics = {k: v / denom for k, v in aux.items()}
    if isinstance(opt_state, state_lib.GuardState):  # train.skip_bad_steps
      metrics.update(skipped=opt_state.consecutive > 0, skipped_steps=opt_state.skipped,
                     skipped_in_a_row=opt_state.consecutive)
    metrics.update({
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(new_trainable),  # of what trains (adapters w/ LoRA)
        'lr': schedule(state['step']),
    })
    metrics['pairs' if dpo else 'loss_tokens'] = denom
    new_state = dict(state, step=state['step'] + 1, opt_state=opt_state)
    new_state[setup.trainable] = new_trainable
    return new_state, metrics

  batch_sh = _batch_shardings(setup, batch_keys(cfg))
  jitted = jax.jit(step, in_shardings=(setup.state_shardings, batch_sh),
                   out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=(0,))

  def run(state, batch):
    with sharding.use_mesh(setup.mesh, setup.rules):
      return jitted(state, batch)

  run.jitted = jitted
  return run


BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')
ROW_KEYS = ('ref_logps', 'index')  # one value per row: [rows], not [rows, seq_len]


def batch_keys(cfg) -> tuple[str, ...]:
  """The arrays of a device batch for cfg's stage (DPO with precomputed references adds
  'ref_logps' [2B])."""
  if reference_mode(cfg) == 'precomputed':
    return BATCH_KEYS + ('ref_logps',)
  return BATCH_KEYS


def check_host_batch(cfg, host: dict) -> None:
  """What the step cannot check on device: with model.attention='cudnn', every row holds
  at most model.max_segments runs of segment ids (a clear error, before the step)."""
  if cfg.model.attention == 'cudnn' and 'segment_ids' in host:
    attn_lib.check_segments(host['segment_ids'], cfg.model.max_segments)


def batch_spec(cfg, mesh, rows: int) -> dict:
  """ShapeDtypeStructs (with shardings) of a global batch of `rows` rows: what the train
  step is compiled for."""
  def spec(k):
    shape = (rows,) if k in ROW_KEYS else (rows, cfg.data.seq_len)
    return jax.ShapeDtypeStruct(shape, jnp.float32 if k in ('loss_mask', 'ref_logps')
                                else jnp.int32,
                                sharding=sharding.batch_sharding(mesh, cfg.rules, len(shape)))
  return {k: spec(k) for k in batch_keys(cfg)}


def make_eval_step(cfg, setup: Setup) -> Callable:
  """(weights, batch) -> (nll sum, loss tokens); weights = setup.weights(state)."""
  del cfg
  graphdef, lora = setup.graphdef, setup.lora

  def step(weights, batch):
    nll, _ = loss_sums(graphdef, weights['params'], batch, 0.0,
                       adapters=weights.get('adapters'), lora=lora)
    return nll, jnp.sum(batch['loss_mask'].astype(jnp.float32))

  return _jit_eval(setup, step, sharding.batch_sharding(setup.mesh, setup.rules))


def _jit_eval(setup, step, batch_sh, weights_sh=None) -> Callable:
  """step(weights, batch) jitted with replicated outputs, run under the mesh; weights_sh:
  the first argument's shardings (default setup.weight_shardings)."""
  weights_sh = setup.weight_shardings if weights_sh is None else weights_sh
  jitted = jax.jit(step, in_shardings=(weights_sh, batch_sh),
                   out_shardings=sharding.replicated(setup.mesh))

  def run(weights, batch):
    with sharding.use_mesh(setup.mesh, setup.rules):
      return jitted(weights, batch)

  return run


def _batch_shardings(setup, keys) -> dict:
  return {k: sharding.batch_sharding(setup.mesh, setup.rules, ndim=1 if k in ROW_KEYS
                                     else 2) for k in keys}


def make_dpo_eval_step(cfg, setup: Setup) -> Callable:
  """(weights, batch) -> sums of the DPO loss and TRL's metrics over the batch's pairs,
  with 'pairs' (no dropout)."""
  sums = dpo_sums(cfg, setup)

  def step(weights, batch):
    _, aux = sums(weights[setup.trainable], weights, batch, None)
    return dict(aux, pairs=jnp.float32(batch['inputs'].shape[0] // 2))

  return _jit_eval(setup, step, _batch_shardings(setup, batch_keys(cfg)))


def make_ref_logps_step(setup: Setup) -> Callable:
  """(params, batch with 'index' [2B]) -> (index, completion log-prob sums) [2B] each,
  replicated to every process: what dpo.reference='precomputed' stores per pair.
  params: the reference's, sharded like setup's params."""
  graphdef = setup.graphdef

  def step(params, batch):
    lp, _ = losses.sequence_sums(*model_stats(graphdef, params, batch), batch['loss_mask'])
    return batch['index'], lp

  return _jit_eval(setup, step, _batch_shardings(setup, BATCH_KEYS + ('index',)),
                   weights_sh=setup.state_shardings['params'])


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
