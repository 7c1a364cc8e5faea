"""Meshes, logical-axis rules and placement helpers.

Parameters and key activations carry logical axis names ('embed', 'mlp', 'heads',
'batch', 'expert', ...). `cfg.rules` maps each onto mesh axes ('data', 'fsdp', 'expert',
'sequence', 'tensor'), so a change of parallelism is a change of config, never of model code.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax.errors import UserError

MESH_AXES = ('data', 'fsdp', 'expert', 'sequence', 'tensor')


class ShardingError(UserError, ValueError):
  """A mesh or sharding rule that does not fit the devices or the model; the message
  names the setting."""


def mesh_shape(cfg_mesh: Mapping[str, int], n_devices: int) -> dict[str, int]:
  """Resolves -1 entries so the product equals n_devices; errors name the field."""
  sizes = {a: int(cfg_mesh.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ShardingError(f'at most one mesh axis may be -1, got {fill} (mesh.{fill[0]}, mesh.{fill[1]})')
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % known:
      raise ShardingError(
          f'mesh {dict(cfg_mesh)}: the fixed axes (product {known}) do not divide the '
          f'{n_devices} devices; change mesh.{"/".join(a for a in sizes if sizes[a] != -1)}')
    sizes[fill[0]] = n_devices // known
  if math.prod(sizes.values()) != n_devices:
    raise ShardingError(
        f'mesh {sizes} has {math.prod(sizes.values())} devices but {n_devices} are '
        f'available; set one of mesh.data/mesh.fsdp/mesh.expert/mesh.sequence/mesh.tensor to -1 or fix the sizes')
  return sizes


def make_mesh(cfg_mesh: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg_mesh, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    # make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def axes_of(target) -> tuple[str, ...]:
  """The mesh axes of a rules entry or a PartitionSpec entry (None, a name, or several)."""
  if target is None:
    return ()
  if isinstance(target, str):
    return (target,)
  return tuple(target)


def logical_to_spec(logical: Sequence[str | None], rules: Mapping[str, Any],
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
  """('batch', 'length', 'embed') -> P(('data', 'fsdp'), None, 'fsdp'-if-unused).

  A mesh axis is used at most once per spec (first dimension wins). With `shape` and
  `mesh`, a dimension the mesh axes do not divide is left replicated.
  """
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ShardingError(f'logical axis {name!r} has no entry in cfg.rules')
    axes = tuple(a for a in axes_of(rules[name]) if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if shape is not None and mesh is not None and axes:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % size:
        axes = ()
    used.update(axes)
    out.append(spec_entry(axes))
  return P(*out)


def spec_entry(axes: Sequence[str]):
  """A PartitionSpec entry for mesh `axes`: None, the axis, or the tuple of them."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def mesh_axes(mesh: Mesh, rules: Mapping[str, Any], logical: str,
              exclude: Sequence[str] = ()) -> tuple[str, ...]:
  """The mesh axes of size > 1 that `rules` map `logical` onto, less `exclude`."""
  return tuple(a for a in axes_of(rules.get(logical)) if mesh.shape[a] > 1 and a not in exclude)


def active_mesh() -> tuple[Mesh, dict] | None:
  """(mesh, rules) of an enclosing `use_mesh` that has a mesh, else None."""
  ctx = current()
  return None if ctx is None or ctx[0] is None else ctx


# The mesh and rules activations are constrained with, set by `use_mesh`.
_CTX = threading.local()


def current() -> tuple[Mesh, dict] | None:
  """The (mesh, rules) of the innermost `use_mesh`, or None."""
  return getattr(_CTX, 'value', None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Mapping[str, Any] | None):
  """Constrain activations by `rules` on `mesh` inside; use_mesh(None, None) turns an
  enclosing context off (for traces that must not depend on it)."""
  prev = getattr(_CTX, 'value', None)
  _CTX.value = None if rules is None else (mesh, dict(rules))
  try:
    yield
  finally:
    _CTX.value = prev


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh`."""
  ctx = getattr(_CTX, 'value', None)
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = logical_to_spec(logical, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def tree_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh,
                   rules: Mapping[str, Any]) -> Any:
  """Maps a tree of logical PartitionSpecs (+ matching shapes) to NamedShardings."""
  def one(spec, leaf):
    return NamedSharding(mesh, logical_to_spec(tuple(spec), rules, leaf.shape, mesh))
  return jax.tree.map(one, logical_tree, abstract_tree,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any], ndim: int = 2) -> NamedSharding:
  logical = ('batch', 'length') + (None,) * (ndim - 2)
  return NamedSharding(mesh, logical_to_spec(logical[:ndim], rules, mesh=mesh))


def data_parallel_size(mesh: Mesh, rules: Mapping[str, Any]) -> int:
  return math.prod(mesh.shape[a] for a in axes_of(rules['batch']))


def place_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                rules: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded along 'batch'."""
  out = {}
  for k, v in batch.items():
    sharding = batch_sharding(mesh, rules, v.ndim)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def put_along_batch(arrays: Sequence[np.ndarray], mesh: Mesh | None,
                    rules: Mapping[str, Any] | None) -> tuple[jax.Array, ...]:
  """Host arrays, the same on every process, onto `mesh` split along their first axis by
  the 'batch' rule (replicated without rules; on the default device without a mesh).
  Explicit copies: clean under jax.transfer_guard('disallow')."""
  if mesh is None:
    return tuple(jax.device_put(tuple(arrays)))

  def spec(x):
    if not rules:
      return P()
    return logical_to_spec(('batch',) + (None,) * (x.ndim - 1), rules, x.shape, mesh)

  return tuple(jax.device_put(tuple(arrays), tuple(NamedSharding(mesh, spec(x))
                                                   for x in arrays)))


def mesh_rules_key(mesh: Mesh | None, rules: Mapping[str, Any] | None):
  """(mesh, rules as a sorted tuple) for a jit static argument, or None without a mesh."""
  if mesh is None:
    return None
  if not rules:
    return mesh, None
  return mesh, tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in dict(rules).items()))
