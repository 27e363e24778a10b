"""Orbax checkpoints of the train state, the data iterator and run metadata.

Layout: `<directory>/<step>/{state,data,meta}`. Saves are asynchronous (the host keeps
training while arrays are written) and atomic (orbax writes to a temporary directory and
renames it when complete, so a crash mid-save leaves the previous checkpoint as the latest).
Restores take an abstract state whose leaves carry the target shardings, so a checkpoint written
on one mesh restores onto another.

Checksums: `save` computes on the devices a 64-bit checksum of every array of the state (each
value's bits mixed with its position and summed in uint32, so the result does not depend on the
mesh and a restore onto another mesh verifies it), records each array's shape and dtype, and the
SHA-256 of the meta JSON and of each process's data-iterator state. Orbax writes this record
into the step's `_CHECKPOINT_METADATA` in its commit callback, after every item is written (a step
without it did not complete). `restore` checks the files, the record and the restored values
against it; anything wrong is a `Damage` (step, file, cause). `restore_latest` walks back from the
newest step to the newest intact one, reporting every damaged step and, for the trainer, moving it
into `<directory>/damaged/` (never deleting it) before anything is saved: orbax's max_to_keep then
cannot delete the last good step to keep a damaged newer one. A state with a non-finite value is
refused before anything is written (`NonFiniteState`), so every checkpoint holds finite values.

Preemption: `Checkpointer.preempted(step)` is True after SIGTERM (the handler and its contract are
corpo_jax/train/preemption.py) or when JAX's multi-host preemption notice arrives; the loop then
saves and exits 0.

One module (over 400 lines) because saving, the checksum record and restoring are one format:
the record `save` writes in orbax's commit callback is what `restore` verifies, and
`restore_latest`'s damage handling reads both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils

from corpo_jax import distributed
from corpo_jax.train.preemption import sigterm_received

# Orbax splits a replicated array into one slice per replica so that replicas (hosts) share its
# write. Below this many bytes per slice that costs more than it saves: each new slice shape is a
# compiled XLA program (the smoke run on 8 CPU devices compiled 144 of them, 4.4 s, to write
# kilobytes). Larger replicated arrays keep the parallel write.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
  absl_logger = logging.getLogger("absl")  # orbax warns about every override; this one is ours
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


class _DropBackgroundTracebacks(logging.Filter):
  """Orbax logs a background write's error with its traceback once per thread that sees it
  (~330 lines for one full disk); `save`/`wait` raise the same error, named, so drop the logs."""

  LOGGED = ("_SignalingThread.run() raised an exception", "in background save thread",
            "Save Finalize thread")

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in self.LOGGED)


logging.getLogger("absl").addFilter(_DropBackgroundTracebacks())


# ----------------------------------------------------------------------------- checksums

CHECKSUMS = "corpo_jax_checksums"  # the record's key in the step's custom metadata
# The record of a step saved before checksums were recorded (its custom metadata has none):
# restored with a warning, unverified, so that older workdirs resume.
UNVERIFIED: dict = {}


def _mix(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
  h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
  """The array's raw bits as uint32 (one per value; values are at most 32 bits wide)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)


def _position(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major index, modulo 2**32."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for d in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride % 2**32)
    stride *= shape[d]
  return index


def _nonfinite(x: jax.Array, u: jax.Array) -> jax.Array:
  """1 where a float's exponent bits are all ones (inf, NaN), from its bits: cheaper to compile
  than isfinite."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros(x.shape, jnp.uint32)
  info = jnp.finfo(x.dtype)
  exponent = np.uint32(((1 << info.nexp) - 1) << info.nmant)
  return ((u & exponent) == exponent).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """[two uint32 lanes of sum(mix(bits, position)), the count of non-finite values], one
  reduction. A change of one value always changes the first lane (mix is a bijection, the sum
  wraps mod 2**32); sums of integers are exact in any order, so any mesh gives the same result."""
  u, i = _bits(x), _position(x.shape)
  terms = jnp.stack([_mix(u + i * np.uint32(0x9E3779B9)), _mix(u ^ _mix(i + np.uint32(0x7F4A7C15))),
                     _nonfinite(x, u)], axis=-1)
  return jnp.sum(terms, axis=tuple(range(x.ndim)), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_checksum(x) for x in leaves]


def _arrays(tree: Any) -> list[tuple[str, Any]]:
  """(path such as "params/layers/attn/q", leaf) of every leaf."""
  return [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def checksums(tree: Any) -> tuple[dict[str, str], dict[str, int]]:
  """({path: 16 hex digits}, {path: non-finite count}) of a pytree of jax arrays (a collective
  in a multi-process run: every process calls it)."""
  arrays = _arrays(tree)
  groups: dict[frozenset, list[int]] = {}  # one program per set of devices the leaves are on
  for n, (_, x) in enumerate(arrays):
    groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(n)
  out = [None] * len(arrays)
  for members in groups.values():
    for n, result in zip(members, distributed.fetch(_checksums([arrays[n][1] for n in members]))):
      out[n] = result
  return ({path: f"{int(r[0]):08x}{int(r[1]):08x}" for (path, _), r in zip(arrays, out)},
          {path: int(r[2]) for (path, _), r in zip(arrays, out)})


def _sha(value: Any) -> str:
  data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
  return hashlib.sha256(data).hexdigest()


def _iterator_text(data_iterator: Any) -> bytes:
  """The data iterator's state as grain's checkpoint handler writes it."""
  state = data_iterator.get_state()
  return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()


def _data_digests(data_iterator: Any) -> list[str]:
  """SHA-256 of every process's data-iterator state, in process order."""
  digest = np.frombuffer(hashlib.sha256(_iterator_text(data_iterator)).digest(), np.uint8)
  if jax.process_count() > 1:
    return [bytes(row).hex() for row in multihost_utils.process_allgather(digest)]
  return [bytes(digest).hex()]


class NonFiniteState(ValueError):
  """The state to save holds NaN or inf; nothing was written."""

  def __init__(self, counts: dict[str, int]):
    self.counts = counts
    worst = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
    super().__init__(f"{sum(counts.values())} non-finite values in {len(counts)} arrays "
                     f"({worst}{', ...' if len(counts) > 3 else ''})")


@dataclasses.dataclass(frozen=True)
class Damage:
  """What is wrong with one checkpoint step: `file` is relative to the step's directory."""

  step: int
  file: str
  cause: str

  def __str__(self) -> str:
    return f"step {self.step}: {self.file}: {self.cause}"


class DamagedCheckpoint(ValueError):
  def __init__(self, directory: str, damage: Damage):
    self.damage = damage
    super().__init__(f"Checkpoint {directory}/{damage.step} is damaged: {damage.file}: "
                     f"{damage.cause}.")


def _agree(step: int, damage: Damage | None) -> Damage | None:
  """Every process's verdict on a step: damaged if it is damaged for any process."""
  if jax.process_count() > 1 and distributed.max_over_processes(int(damage is not None)):
    return damage or Damage(step, "(another process's files)", "damaged for another process")
  return damage


def _error_text(e: BaseException) -> str:
  """An orbax/tensorstore error without the tensorstore spec it appends (kilobytes of JSON)."""
  text = str(e) or type(e).__name__
  if "See full TensorStore details" in text and e.__cause__ is not None:
    text = f"{text.split(' See full')[0]} {e.__cause__}"
  return re.split(r" \[tensorstore_spec", text)[0].strip()


def _damage_from(step: int, step_dir: str, e: Exception) -> Damage:
  """The file and cause a failed restore names (tensorstore names the file it read)."""
  text = _error_text(e)
  files = list(re.finditer(r'local file "([^"]+)"', text))
  if not files:
    return Damage(step, "state", f"{type(e).__name__}: {text[:300]}")
  cause = text[files[-1].end():].lstrip('": ') or text
  return Damage(step, os.path.relpath(files[-1].group(1), step_dir), cause[:300])


class Checkpointer:
  """Saves and restores (state, data iterator, metadata) under one directory."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    directory = os.path.abspath(directory)
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      raise ValueError(f"Cannot create checkpoint directory {directory!r} ({e}); choose a "
                       f"writable --config.workdir.") from e
    if not os.access(directory, os.W_OK):
      raise ValueError(f"Checkpoint directory {directory!r} is not writable; choose a writable "
                       f"--config.workdir.")
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any],
           data_iterator: grain.DataLoaderIterator | Any | None = None, *,
           force: bool = True) -> bool:
    """Starts an asynchronous save of `state` (a pytree of jax arrays) at `step`, with its
    checksum record (module doc); raises NonFiniteState, writing nothing, if a value is NaN or
    inf."""
    sums, nonfinite = checksums(state)
    if any(nonfinite.values()):
      raise NonFiniteState({k: v for k, v in nonfinite.items() if v})
    record = {"arrays": {path: {"shape": list(x.shape), "dtype": str(x.dtype),
                                "checksum": sums[path]} for path, x in _arrays(state)},
              "meta": _sha(meta),
              "data": None if data_iterator is None else _data_digests(data_iterator)}
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:  # also raises a previous asynchronous save's error
      custom = {CHECKSUMS: record, f"{CHECKSUMS}_sha256": _sha(record)}
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force,
                                custom_metadata=custom)
    except Exception as e:  # disk errors come as OSError or as tensorstore's ValueError
      if (error := self._write_error(e)) is None:
        raise
      raise error from e

  def restore(self, step: int, abstract_state: Any,
              data_iterator: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores the state into `abstract_state`'s shapes, dtypes and shardings and verifies it
    against the step's checksum record; raises DamagedCheckpoint naming the file and cause.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with `.sharding` set (e.g. from
    `jax.eval_shape` plus the shardings the run uses now). `data_iterator` is restored in place.
    """
    step_dir = os.path.join(self.directory, str(step))
    record, damage = self._read_record(step, step_dir)
    if record is UNVERIFIED:
      logging.warning("checkpoint %s/%d was saved before checksums were recorded: restored "
                      "without verification", self.directory, step)
    elif record is not None:
      damage = self._check_files(step, step_dir, record, data_iterator)
    if damage := _agree(step, damage):
      raise DamagedCheckpoint(self.directory, damage)
    if record is not UNVERIFIED:
      self._check_layout(step, record, abstract_state, data_iterator)
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore raises ValueError or a bare Exception
      damage = _damage_from(step, step_dir, e)
    if damage := _agree(step, damage):
      raise DamagedCheckpoint(self.directory, damage)
    if record is UNVERIFIED:
      return restored["state"], dict(restored["meta"])
    sums, _ = checksums(restored["state"])
    wrong = [p for p, a in record["arrays"].items() if sums[p] != a["checksum"]]
    if wrong:
      raise DamagedCheckpoint(self.directory, Damage(
          step, "state", f"the restored values of {len(wrong)} arrays ({', '.join(wrong[:3])}"
          f"{', ...' if len(wrong) > 3 else ''}) do not match their checksums"))
    return restored["state"], dict(restored["meta"])

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None = None, *,
                     set_aside: bool, report: Callable[[str], None]
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest intact step, None without any step. Each damaged newer
    step is reported and, with `set_aside`, moved into `<directory>/damaged/`. Raises ValueError
    listing every step when none is intact (and moves nothing)."""
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state, data_iterator)
      except DamagedCheckpoint as e:
        damaged.append(e.damage)
        continue
      for d in damaged:
        moved = f"; moved to {self._set_aside(d.step)}" if set_aside else ""
        report(f"checkpoint {self.directory}/{d.step} is damaged ({d.file}: {d.cause}){moved}; "
               f"using step {step}")
      if set_aside and damaged:
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices("corpo_jax checkpoint set aside")
        self._manager.reload()
      return step, state, meta
    if damaged:
      raise ValueError(f"No intact checkpoint under {self.directory}: "
                       + "; ".join(map(str, damaged)) + ". Restore the files, or move the "
                       "directory away to start this stage from its beginning.")
    return None

  def restore_meta(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def preempted(self, step: int) -> bool:
    """True once SIGTERM arrived or a multi-host preemption notice reached `step`."""
    return sigterm_received() or self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # as in save
      if (error := self._write_error(e)) is None:
        raise
      raise error from e

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def _read_record(self, step: int, step_dir: str) -> tuple[dict | None, Damage | None]:
    name = "_CHECKPOINT_METADATA"
    try:
      with open(os.path.join(step_dir, name)) as f:
        custom = json.load(f)["custom_metadata"]
      record, digest = custom.get(CHECKSUMS), custom.get(f"{CHECKSUMS}_sha256")
    except FileNotFoundError:
      return None, Damage(step, name, "missing (the save did not complete)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      return None, Damage(step, name, f"unreadable ({type(e).__name__}: {e})")
    if record is None:  # saved before checksums were recorded: restorable, not verifiable
      return UNVERIFIED, None
    if _sha(record) != digest:
      return None, Damage(step, name, "the checksum record does not match its SHA-256")
    return record, None

  def _check_files(self, step: int, step_dir: str, record: dict,
                   data_iterator: Any | None) -> Damage | None:
    """Damage of the small files, checked before orbax reads them (it would name none)."""
    try:
      with open(os.path.join(step_dir, "meta", "metadata"), "rb") as f:
        meta = json.load(f)
    except FileNotFoundError:
      return Damage(step, "meta/metadata", "missing")
    except (OSError, ValueError) as e:
      return Damage(step, "meta/metadata", f"unreadable ({type(e).__name__}: {e})")
    if _sha(meta) != record["meta"]:
      return Damage(step, "meta/metadata", "its contents do not match the recorded SHA-256")
    try:
      with open(os.path.join(step_dir, "state", "_METADATA"), "rb") as f:
        json.load(f)
    except FileNotFoundError:
      return Damage(step, "state/_METADATA", "missing")
    except (OSError, ValueError) as e:
      return Damage(step, "state/_METADATA", f"unreadable ({type(e).__name__}: {e})")
    data = record["data"]
    if data_iterator is None or not data or len(data) != jax.process_count():
      return None  # _check_layout refuses a mismatch
    name = f"data/process_{jax.process_index()}-of-{jax.process_count()}.json"
    try:
      with open(os.path.join(step_dir, name), "rb") as f:
        text = f.read()
    except FileNotFoundError:
      return Damage(step, name, "missing")
    except OSError as e:
      return Damage(step, name, f"unreadable ({e})")
    if _sha(text) != data[jax.process_index()]:
      return Damage(step, name, "its contents do not match the recorded SHA-256")
    return None

  def _check_layout(self, step: int, record: dict, abstract_state: Any,
                    data_iterator: Any | None) -> None:
    """Refuses a step of another run's layout (config changed, not damage)."""
    saved = {p: f"{a['dtype']}{a['shape']}" for p, a in record["arrays"].items()}
    now = {p: f"{x.dtype}{list(x.shape)}" for p, x in _arrays(abstract_state)}
    differ = [f"{p} {saved.get(p, 'absent')} (this run: {now.get(p, 'absent')})"
              for p in sorted(set(saved) | set(now)) if saved.get(p) != now.get(p)]
    if data_iterator is not None and len(record["data"] or ()) != jax.process_count():
      differ.append(f"data iterator saved by {len(record['data'] or ())} processes (this run: "
                    f"{jax.process_count()})")
    if differ:
      raise ValueError(f"Checkpoint {self.directory}/{step} does not match this run's state "
                       f"(model or optimizer config changed?): {'; '.join(differ[:4])}"
                       f"{'; ...' if len(differ) > 4 else ''}. Use a fresh --config.workdir or "
                       f"the original config.")

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step out of orbax's sight into damaged/ (process 0; never deleted)."""
    dest = os.path.join(self.directory, "damaged", str(step))
    for n in range(1, 1000):
      if not os.path.exists(dest):
        break
      dest = os.path.join(self.directory, "damaged", f"{step}.{n}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), dest)
    return dest

  def _write_error(self, e: Exception) -> ValueError | None:
    """A failed write (disk full, permissions), None for other errors: the complete checkpoints
    are untouched (orbax renames a checkpoint into place only once all of it is written)."""
    text = _error_text(e)
    if not (isinstance(e, OSError) or "os_error_code=" in text):
      return None
    if written := re.search(r'Failed writing: "([^"]+)": (.*)', text):  # tensorstore's
      text = f"{written.group(2)} (writing {written.group(1)})"
    done = sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())
    return ValueError(f"Writing a checkpoint under {self.directory} failed: {text}. The complete "
                      f"checkpoints (steps {done}) are intact; free disk space or fix the "
                      f"permissions, then rerun to resume from the latest.")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's current sharding (a restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
