"""corpo_jax: RL fine-tuning (GRPO, CoRPO, ...) of sharded Mixtral-style MoE models with a thinking head."""

from corpo_jax import host_threads as _host_threads

_host_threads.ensure()  # before JAX creates its CPU client (corpo_jax/host_threads.py)

__version__ = "0.1.0"
