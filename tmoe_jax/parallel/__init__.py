"""Device primitives: the ('data', 'expert') mesh, multi-process start-up, parameter shardings and
the ragged row exchange. The expert-parallel MoE layer built on them is `tmoe_jax.moe.expert_parallel`.

Import the submodules (`mesh`, `distributed`, `sharding`, `ragged_exchange`) directly.
"""
