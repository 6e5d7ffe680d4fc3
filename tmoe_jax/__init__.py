"""tmoe-jax: Transformers with Mixture-of-Experts layers in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
  # `tmoe_jax.load` and `tmoe_jax.from_hf` without importing JAX, Flax and Orbax on `import tmoe_jax`.
  if name == "load":
    from tmoe_jax.loading import load

    return load
  if name == "from_hf":
    from tmoe_jax.hf import from_hf

    return from_hf
  raise AttributeError(f"module 'tmoe_jax' has no attribute {name!r}")
