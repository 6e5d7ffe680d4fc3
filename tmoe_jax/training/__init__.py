"""Training: explicit state, pure jitted steps, Orbax checkpoints and the loops around them."""
