"""Entry point: `python -m corpo_jax.main --config=configs/grpo.py[:args] [--config.x=y ...]`.

The trainer is not built yet (issue: Trainer). Until it lands this runs one sharded forward pass
of the configured model on a random batch and reports what it did.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from corpo_jax import model, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  cfg = model.ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh)
  logging.info("mesh %s over %d %s devices", dict(mesh.shape), mesh.size, jax.default_backend())
  t0 = time.perf_counter()
  params = model.init_params(cfg, jax.random.key(config.seed), mesh)
  n = model.count_params(params)
  batch, length = max(4, mesh.size), 32
  tokens = jax.random.randint(jax.random.key(config.seed + 1), (batch, length), 6, cfg.vocab_size)
  tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, tokens.shape))
  with jax.set_mesh(mesh):
    logits = jax.jit(model.forward, static_argnums=1)(params, cfg, tokens)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()
  print(f"corpo_jax: model with {n / 1e6:.2f}M parameters initialised on mesh {dict(mesh.shape)}; "
        f"forward pass on a random {batch}x{length} batch: logits {tuple(logits.shape)}, "
        f"next-token NLL {float(nll):.3f} (uniform: {float(jnp.log(cfg.vocab_size)):.3f}), "
        f"{time.perf_counter() - t0:.1f}s.")
  print("corpo_jax: the RL trainer is not implemented yet; this run only checked the model.")


if __name__ == "__main__":
  app.run(main)
