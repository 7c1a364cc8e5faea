"""The model's forward pass as the objectives use it, and jitting an eval step.

Everything here takes a `weights` dict, what setup.weights(state) returns: 'params' (the
model's, or with LoRA the frozen base) and, with LoRA, 'adapters'; an objective's own state
entries (a frozen reference copy, an extra head) sit next to them under their names.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax import sharding
from lmjax.models import attention as attn_lib
from lmjax.models import lora as lora_lib
from lmjax.models import moe as moe_lib
from lmjax.train import losses

# The arrays of every token batch, [rows, seq_len]; an objective adds per-row ones ([rows]).
TOKEN_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


def model_stats(graphdef, params, batch, *, adapters=None, lora=None, dropout_rng=None,
                router=False, telemetry=False):
  """(logsumexp, target logit) [B, T] of the model's logits for the batch (losses.
  logit_stats), computed model.loss_chunk positions at a time when set. With `router`,
  ((logsumexp, target logit), the MoE router statistics: moe.RouterStats or None); with
  `telemetry` also the layers' transformer.LayerStats."""
  model = nnx.merge(graphdef, params)
  h, stats, layers = model.hidden_and_stats(batch['inputs'], batch['positions'],
                                            batch['segment_ids'], adapters=adapters,
                                            lora=lora, dropout_rng=dropout_rng,
                                            telemetry=telemetry)
  unembed = lambda x: sharding.constrain(model.unembed(x), ('batch', 'length', 'vocab'))
  out = losses.chunked_logit_stats(h, unembed, batch['targets'], model.cfg.loss_chunk)
  if telemetry:
    return out, stats, layers
  return (out, stats) if router else out


def loss_sums(graphdef, params, batch, z_loss, *, adapters=None, lora=None, dropout_rng=None):
  """(nll, z-loss) summed over the batch's loss tokens (LoRA adapters unmerged if given)."""
  params = lora_lib.effective_params(params, adapters)
  stats = model_stats(graphdef, params, batch, adapters=adapters, lora=lora,
                      dropout_rng=dropout_rng)
  return losses.nll_sums(*stats, batch['loss_mask'], z_loss)


def lm_sums(graphdef, params, batch, z_loss, moe_cfg, *, adapters=None, lora=None,
            dropout_rng=None, telemetry=False):
  """(loss sum, {metric: sum}) of next-token prediction: the nll and z-loss sums and, for
  an MoE model, its router losses (moe.router_losses with `moe_cfg`, cfg.model.moe:
  aux_loss * balance + z_loss * router z) and telemetry, each times the batch's loss tokens, so that
  over the normaliser they come out as the batch's values (under gradient accumulation,
  the micro-batches' values weighted by their loss tokens). With `telemetry`, also the
  stability statistics (`stability_sums`; its maxima combine as `telemetry_reducers` says)."""
  params = lora_lib.effective_params(params, adapters)
  got = model_stats(graphdef, params, batch, adapters=adapters, lora=lora,
                    dropout_rng=dropout_rng, router=True, telemetry=telemetry)
  stats, router, layers = got if telemetry else (*got, None)
  nll, z = losses.nll_sums(*stats, batch['loss_mask'], z_loss)
  metrics = {'loss': nll, 'z_loss': z}
  if telemetry:
    metrics.update(stability_sums(stats[0], layers, batch['loss_mask']))
  if router is None:
    return nll + z, metrics
  router_loss, router_metrics = router_sums(router, moe_cfg, token_count(batch))
  metrics.update(router_metrics)
  return nll + z + router_loss, metrics


def telemetry_reducers(n_layers: int) -> dict:
  """{metric: 'max'} of `stability_sums`' maxima (the rest are sums)."""
  out = {'stability/logz_max': 'max', 'stability/attn_logit_max': 'max'}
  out.update((f'stability/layer{i}/attn_logit_max', 'max') for i in range(n_layers))
  return out


def stability_sums(lse, layers, mask) -> dict:
  """The forward pass's stability telemetry as LM metric sums (over the loss-token
  normaliser: the batch's values): log Z = logsumexp of the output logits, its sum over
  loss tokens ('stability/logz_mean') and max ('stability/logz_max'); per layer i the max
  |attention logit| ('stability/layer<i>/attn_logit_max'; 'stability/attn_logit_max' over
  layers) and the residual stream's RMS times the loss tokens ('.../resid_rms')."""
  lse, mask = jax.lax.stop_gradient(lse), mask.astype(jnp.float32)
  n = jnp.sum(mask)
  out = {'stability/logz_mean': jnp.sum(lse * mask),
         'stability/logz_max': jnp.max(jnp.where(mask > 0, lse, -jnp.inf)),
         'stability/attn_logit_max': jnp.max(layers.attn_logit_max)}
  for i in range(layers.resid_rms.shape[0]):
    out[f'stability/layer{i}/attn_logit_max'] = layers.attn_logit_max[i]
    out[f'stability/layer{i}/resid_rms'] = layers.resid_rms[i] * n
  return out


def router_sums(router, moe_cfg, n):
  """(n x an MoE model's router losses, {telemetry: n x value}) from its router
  statistics (moe.router_losses), for an objective whose sums are divided by a normaliser
  this batch counts n of (loss tokens, pairs, examples): over it they come out as the
  batch's values. (0, {}) for a dense model (router None)."""
  if router is None:
    return 0.0, {}
  loss, telemetry = moe_lib.router_losses(router, moe_cfg)
  return loss * n, {k: v * n for k, v in telemetry.items()}


def row_logps(graphdef, params, batch, *, adapters=None, lora=None, dropout_rng=None,
              router=False):
  """(log-prob sums, loss-token counts) [rows] of each row's loss tokens: one forward pass
  for every row of the batch (the completions of pairs, labelled rows, ...). With
  `router`, (that, the MoE router statistics or None)."""
  params = lora_lib.effective_params(params, adapters)
  stats, stats_router = model_stats(graphdef, params, batch, adapters=adapters, lora=lora,
                                    dropout_rng=dropout_rng, router=True)
  out = losses.sequence_sums(*stats, batch['loss_mask'])
  return (out, stats_router) if router else out


def sampling_logps(graphdef, params, batch, sampling: dict, *, adapters=None, lora=None,
                   dropout_rng=None):
  """(log-prob of each target, entropy) [rows, T] under the distribution a sampler with
  `sampling` ({'temperature', 'top_k', 'top_p'}) draws from (losses.sampling_stats),
  computed model.loss_chunk positions at a time when set."""
  params = lora_lib.effective_params(params, adapters)
  model = nnx.merge(graphdef, params)
  h = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'],
                   adapters=adapters, lora=lora, dropout_rng=dropout_rng)
  unembed = lambda x: sharding.constrain(model.unembed(x), ('batch', 'length', 'vocab'))
  stats = lambda logits, targets: losses.sampling_stats(logits, targets, **sampling)
  return losses.chunked_logit_stats(h, unembed, batch['targets'], model.cfg.loss_chunk, stats)


def check_host_batch(cfg, host: dict) -> None:
  """What the step cannot check on device: with model.attention='cudnn', every row holds
  at most model.max_segments runs of segment ids (a clear error, before the step)."""
  if attn_lib.implementation(cfg.model) == 'cudnn' and 'segment_ids' in host:
    attn_lib.check_segments(host['segment_ids'], cfg.model.max_segments)


def batch_shardings(mesh, rules, spec: dict) -> dict:
  """{key: sharding} of a batch whose arrays have the ranks of `spec` ({key: (shape,
  dtype)}): every array split over the data-parallel axes along its rows."""
  return {k: sharding.batch_sharding(mesh, rules, ndim=len(shape))
          for k, (shape, _) in spec.items()}


def jit_eval(setup, step, batch_sh, weights_sh=None) -> Callable:
  """step(weights, batch) jitted with replicated outputs, run under the mesh; weights_sh:
  the first argument's shardings (default setup.weight_shardings)."""
  weights_sh = setup.weight_shardings if weights_sh is None else weights_sh
  jitted = jax.jit(step, in_shardings=(weights_sh, batch_sh),
                   out_shardings=sharding.replicated(setup.mesh))

  def run(weights, batch):
    with sharding.use_mesh(setup.mesh, setup.rules):
      return jitted(weights, batch)

  return run


def token_count(batch) -> jax.Array:
  """The batch's loss tokens, float32."""
  return jnp.sum(batch['loss_mask'].astype(jnp.float32))
