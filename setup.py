"""corpo_jax: RL fine-tuning (GRPO, CoRPO, ...) of sharded Mixtral-style MoE models in JAX."""

from setuptools import find_packages, setup

setup(
    name="corpo_jax",
    version="0.1.0",
    description="GRPO/CoRPO reinforcement learning for sharded Mixtral-style MoE models with a "
                "thinking head, in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["corpo_jax", "corpo_jax.*", "configs"]),
    package_data={"corpo_jax.data": ["assets/*"]},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "sentencepiece>=0.2.0",
        "ml_collections>=1.1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.6",  # Hugging Face checkpoints in and out (config.init_from, export)
        "tensorboardX>=2.6",  # workdir/tensorboard event files (corpo_jax/train/metrics.py)
        "matplotlib>=3.8",  # python -m corpo_jax.plot, launch/sweep.py's plots
    ],
    extras_require={
        # tensorboard: its event reader checks the event files the trainer writes; pyarrow: the
        # Parquet tests.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "chex>=0.1.90",
                 "tensorboard>=2.16", "pyarrow>=15"],
        # Parquet task files (config.tasks.<name>.path=x.parquet); pyarrow is a ~170 MB install.
        "parquet": ["pyarrow>=15"],
        # torch is pinned: other versions pull GBs of CUDA wheels. Only the HF parity tests use it.
        "hf": ["torch==2.13.0", "transformers>=5.0"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
)
