"""corpo_jax: RL fine-tuning (GRPO, CoRPO, ...) of sharded Mixtral-style MoE models with a thinking head."""

__version__ = "0.1.0"
