"""Task models built from the tmoe_jax building blocks (one module per experiment family)."""
