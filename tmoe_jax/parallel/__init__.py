"""Parallelism: the ('data', 'expert') device mesh, expert-parallel MoE and parameter shardings.

Import the submodules (`mesh`, `expert_parallel`, `sharding`) directly. Nothing is
re-exported here so that `tmoe_jax.config` can import `parallel.mesh` without pulling
in `expert_parallel`, which imports `tmoe_jax.moe`, which imports `tmoe_jax.config`.
"""
