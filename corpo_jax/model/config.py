"""The one frozen description of a model, and the one place a config dict becomes it."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

DISPATCH_MODES = ("capacity", "sort", "expert_parallel", "cpu_dropless")
INDIVISIBLE_PARAMS = ("raise", "replicate")
REMAT_POLICIES = ("none", "full", "dots", "experts", "dots_and_experts")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Mixtral-style MoE decoder with an optional thinking head.

  Shape letters used across corpo_jax.model: B batch, T time (new tokens), S cache slots,
  D d_model, N query heads, K kv heads, H head dim, E experts, A experts chosen per token (top_k),
  C expert capacity, F expert ffn width, V vocab, L layers.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  num_experts: int
  top_k: int
  rope_theta: float = 1e6
  norm_eps: float = 1e-5
  max_seq_len: int = 4096  # longest sequence a KV cache may hold; exported to HF configs
  tie_embeddings: bool = False  # unembed with the transposed token embedding (Mixtral: False)
  # Mixture of experts.
  # The MoE dispatch, chosen by this field alone (corpo_jax/model/moe.py): "capacity" (drops past
  # capacity while training), "sort" (dropless, ragged_dot: TPU/GPU), "expert_parallel" (GShard:
  # capacity per device, all_to_all to the experts' owners; the path for a mesh) or
  # "cpu_dropless" (the single-device XLA:CPU path of the demo). Dropless when decoding.
  moe_dispatch: str = "capacity"
  capacity_factor: float = 2.0  # capacity path: slots per expert = cf * tokens * top_k / E (>= E/top_k: no drops)
  load_balance_weight: float = 0.01  # Switch load-balancing loss weight (mean over layers)
  z_loss_weight: float = 1e-3  # router z-loss weight (ST-MoE)
  # Thinking head: extra decoder layers on the base's final residual stream.
  thinking_layers: int = 0  # 0 = plain Mixtral
  thinking_shared_unembed: bool = True  # thinking head reuses the base unembedding
  num_step_classes: int = 5  # step-type classifier classes (docs/algorithms.md)
  # Token ids the model needs to know about (-1: the vocabulary has no such token). The trainer
  # sets them from its tokenizer (TOKENIZER_FIELDS); the defaults are the bundled tokenizer's.
  pad_id: int = 0
  think_start_id: int = 4
  think_end_id: int = 5
  # Numerics and memory.
  dtype: str = "float32"  # compute dtype of activations and matmuls; router/softmax/logits stay float32
  param_dtype: str = "float32"
  # "none", "full" (recompute each layer), "dots" (save the unbatched matmuls), "experts" (save
  # the expert matmuls), "dots_and_experts" (both); corpo_jax/model/transformer.py
  remat: str = "none"
  # A parameter dimension that a mesh axis of its sharding rule does not divide (corpo_jax/
  # sharding.py): "raise" refuses the layout, naming the parameter; "replicate" keeps that
  # dimension whole along the axis (every device of the axis holds all of it).
  indivisible_params: str = "raise"

  def __post_init__(self):
    for field in _POSITIVE_INTS:
      value = getattr(self, field)
      if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{field}={value!r} must be a positive integer.")
    for field in ("rope_theta", "norm_eps"):
      if not getattr(self, field) > 0:
        raise ValueError(f"model.{field}={getattr(self, field)!r} must be > 0.")
    for field in ("load_balance_weight", "z_loss_weight"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"model.{field}={getattr(self, field)!r} must be >= 0 (0 disables it).")
    for field in ("pad_id", "think_start_id", "think_end_id"):
      if not -1 <= getattr(self, field) < self.vocab_size:
        raise ValueError(f"model.{field}={getattr(self, field)} must be a token id in "
                         f"[0, model.vocab_size={self.vocab_size}) or -1 (no such token).")
    if self.think_start_id >= 0 and self.think_start_id == self.think_end_id:
      raise ValueError(f"model.think_start_id and model.think_end_id are both "
                       f"{self.think_start_id}; a think span needs two distinct tokens.")
    _check_choice("moe_dispatch", self.moe_dispatch, DISPATCH_MODES)
    _check_choice("remat", self.remat, REMAT_POLICIES)
    _check_choice("indivisible_params", self.indivisible_params, INDIVISIBLE_PARAMS)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention).")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"model.top_k={self.top_k} must be in [1, model.num_experts={self.num_experts}].")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings.")
    if self.thinking_layers < 0:
      raise ValueError(f"model.thinking_layers={self.thinking_layers} must be >= 0.")
    if self.capacity_factor <= 0:
      raise ValueError(f"model.capacity_factor={self.capacity_factor} must be > 0.")

  @property
  def has_thinking_head(self) -> bool:
    return self.thinking_layers > 0

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
    if name not in PRESETS:
      raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """The one place a (ml_collections or plain) dict of model fields becomes a ModelConfig."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown model config field(s) {unknown}; valid fields: {sorted(names)}.")
    return cls(**d)


# Fields the trainer takes from its tokenizer, never from config.model (corpo_jax/train/loop.py).
TOKENIZER_FIELDS = ("pad_id", "think_start_id", "think_end_id")

_POSITIVE_INTS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "d_ff", "num_experts", "top_k", "max_seq_len", "num_step_classes")


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"model.{field}={value!r} is not one of {choices}.")


PRESETS: dict[str, ModelConfig] = {
    # Unit tests: every dimension divides the test meshes (up to 8 fake devices).
    "tiny": ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4,
                        head_dim=8, d_ff=128, num_experts=4, top_k=2, max_seq_len=256,
                        thinking_layers=1),
    # The CPU demo: small enough to learn the bundled arithmetic from scratch in minutes.
    "demo": ModelConfig(vocab_size=1024, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=32, d_ff=256, num_experts=4, top_k=2, max_seq_len=512,
                        thinking_layers=1, moe_dispatch="cpu_dropless"),
    # Mixtral-8x7B-v0.1 (46.7B parameters) and Mixtral-8x22B-v0.1 (141B); no thinking head by
    # default, no pad or think tokens (Mixtral's tokenizer: unk 0, bos 1, eos 2, no pad),
    # expert-parallel MoE (docs/scale.md: the 8x7B update needs 24 GiB per device on 256).
    "mixtral_8x7b": ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                                num_kv_heads=8, head_dim=128, d_ff=14336, num_experts=8, top_k=2,
                                max_seq_len=32768, pad_id=-1, think_start_id=-1, think_end_id=-1,
                                moe_dispatch="expert_parallel", dtype="bfloat16", remat="full"),
    "mixtral_8x22b": ModelConfig(vocab_size=32000, d_model=6144, num_layers=56, num_heads=48,
                                 num_kv_heads=8, head_dim=128, d_ff=16384, num_experts=8, top_k=2,
                                 max_seq_len=65536, pad_id=-1, think_start_id=-1, think_end_id=-1,
                                 moe_dispatch="expert_parallel", dtype="bfloat16", remat="full"),
}
