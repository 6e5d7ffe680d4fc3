"""Embedded, download-free datasets and tokenisation for tmoe_jax."""
