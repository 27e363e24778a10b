"""The one place that declares how arrays are laid out over the device mesh.

Parameters and activations carry logical axis names (``("embed", "mlp")``); `RULES` maps each
name to mesh axes. For activations, a mesh axis that does not divide an array dimension is
dropped for that array (it is replicated along that axis): a small evaluation batch runs on any
mesh. For parameters (`tree_shardings`) that would be a silent memory blow-up at scale (a
vocabulary of 32003 rows whole on every device of the tensor axis), so it is an error naming the
parameters, unless the model config says `indivisible_params="replicate"`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes (a tuple shards over several mesh axes, None replicates).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("exp", "expert"),
    ("layers", None),
    ("head_dim", None),
    ("length", None),
    ("act_embed", None),
    ("capacity", None),
    ("classes", None),
    ("norm", None),
)
_RULES = RULES_BY_NAME = dict(RULES)
BATCH_AXES = _RULES["batch"]  # mesh axes the rows of a batch are split over


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry so the product equals `num_devices`; validates the rest."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh={shape} needs {len(MESH_AXES)} sizes, one per axis {MESH_AXES}.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh={shape}: sizes must be positive, with at most one -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh={shape}: {num_devices} devices are not divisible by {known}.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh={shape} has {math.prod(shape)} slots but {num_devices} devices are "
                     f"available; make the product match or use -1 for one axis.")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1, 1), devices: Sequence[Any] | None = None,
              dcn: Sequence[int] | None = None) -> Mesh:
  """A mesh over axes (data, fsdp, expert, tensor) with Auto axis types (GSPMD propagation).

  `dcn`: for a run over several slices, how many slices each axis spans (`hybrid_devices`);
  None or all ones: one slice (or no slices: CPU, one GPU host)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(shape, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if dcn is None or math.prod(dcn) == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(hybrid_devices(shape, dcn, devices), MESH_AXES, axis_types=axis_types)


def hybrid_devices(shape: Sequence[int], dcn: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """The device array of a multi-slice mesh: axis i of the global `shape` spans dcn[i] slices,
  joined by the data-center network (DCN), and shape[i] / dcn[i] devices of one slice, joined by
  the chips' interconnect (ICI); `mesh_utils.create_hybrid_device_mesh` orders each slice's
  devices by its physical topology. Put the axes whose collectives are rare and large across
  slices: data first (one gradient all-reduce per step), then fsdp. A slice is a TPU slice
  (`device.slice_index`); devices without one (GPU, CPU) group by process."""
  dcn = tuple(int(d) for d in dcn)
  if len(dcn) != len(MESH_AXES) or any(d < 1 for d in dcn):
    raise ValueError(f"dcn_mesh={dcn} needs {len(MESH_AXES)} positive sizes, one per axis "
                     f"{MESH_AXES}: the number of slices each axis spans.")
  uneven = [a for a, s, d in zip(MESH_AXES, shape, dcn) if s % d]
  if uneven:
    raise ValueError(f"dcn_mesh={dcn} does not divide mesh={tuple(shape)} along {uneven}: each "
                     f"axis's slice count must divide its size.")
  granule = "slice_index" if hasattr(devices[0], "slice_index") else "process_index"
  found = len({getattr(d, granule) for d in devices})
  if found != math.prod(dcn):
    kind = "TPU slices" if granule == "slice_index" else "processes"
    raise ValueError(f"dcn_mesh={dcn} spans {math.prod(dcn)} slices but the {len(devices)} "
                     f"devices are in {found} {kind}; make the product of dcn_mesh the number "
                     f"of slices (the queued resource's node count).")
  ici = tuple(s // d for s, d in zip(shape, dcn))
  return mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=granule == "process_index",
      allow_split_physical_axes=True)


def decode_mesh(mesh: Mesh) -> Mesh:
  """The sampler's view of the trainer's devices: the fsdp axis folded into tensor, so
  (data, 1, expert, fsdp * tensor). A decode step runs one token per row, so gathering FSDP-sharded
  weights every step costs more than splitting the matmuls further (XLA hoists those gathers out
  of the decode loop, and every device then holds all the weights it touches): on this view the
  weights split over expert and tensor (heads, d_ff, vocab) and the batch over data and expert."""
  d, f, x, t = (mesh.shape[a] for a in MESH_AXES)
  devices = mesh.devices.transpose(0, 2, 1, 3).reshape(d, 1, x, f * t)
  return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_sizes: dict[str, int] | None = None) -> P:
  """Maps logical axis names to a PartitionSpec; drops mesh axes that do not divide `shape`."""
  spec, used = [], set()
  for i, name in enumerate(names):
    axes = _RULES.get(name) if name is not None else None
    if name is not None and name not in _RULES:
      raise ValueError(f"Logical axis {name!r} has no rule in corpo_jax.sharding.RULES.")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    if shape is not None and mesh_sizes is not None:
      kept, size = [], shape[i]
      for a in axes:  # keep the longest prefix of mesh axes that divides the dimension
        if size % mesh_sizes[a]:
          break
        kept.append(a)
        size //= mesh_sizes[a]
      axes = tuple(kept)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape)))


def indivisible_axes(names: Sequence[str | None], shape: Sequence[int],
                     mesh_sizes: dict[str, int]) -> list[tuple[int, str]]:
  """(dimension, mesh axis) pairs where a mesh axis larger than 1 that the dimension's rule names
  is dropped because it does not divide what is left of the dimension."""
  axes = lambda entry: () if entry is None else (entry,) if isinstance(entry, str) else entry
  kept = logical_to_spec(names, shape, mesh_sizes)
  return [(i, a) for i, (want, got) in enumerate(zip(logical_to_spec(names), kept))
          for a in axes(want) if a not in axes(got) and mesh_sizes[a] > 1]


def tree_shardings(boxed_tree: Any, mesh: Mesh, *, indivisible: str = "raise") -> Any:
  """NamedShardings for a tree of `nn.Partitioned` (or plain) leaves, e.g. from jax.eval_shape.
  A dimension that a mesh axis of its rule does not divide raises ValueError naming every such
  leaf, unless `indivisible="replicate"` (module doc)."""
  sizes = dict(mesh.shape)
  problems = []

  def one(path, leaf):
    if not isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, P())
    for dim, axis in indivisible_axes(leaf.names, leaf.value.shape, sizes):
      problems.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.value.shape)} dimension {dim} "
                      f"({leaf.names[dim]}) over mesh axis {axis!r}={sizes[axis]}")
    return named_sharding(mesh, leaf.names, leaf.value.shape)

  out = jax.tree_util.tree_map_with_path(one, boxed_tree,
                                         is_leaf=lambda x: isinstance(x, nn.Partitioned))
  if problems and indivisible == "raise":
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4
                                       else "")
    raise ValueError(f"Mesh {sizes} does not divide {len(problems)} parameter dimension(s): "
                     f"{shown}. Choose a mesh whose axes divide them, change the model's sizes, "
                     f"or set --config.model.indivisible_params=replicate to keep those "
                     f"dimensions whole along the axis (more memory per device).")
  return out


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint under the mesh set with `jax.set_mesh`; no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(names, x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))
  return jax.lax.with_sharding_constraint(x, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Sharding for a [B, ...] host batch: batch over (data, fsdp, expert), the rest replicated."""
  return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)
