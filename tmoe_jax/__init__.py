"""tmoe-jax: Transformers with Mixture-of-Experts layers in JAX/Flax NNX."""

__version__ = "0.1.0"
