"""lipflow_jax: LiP-Flow (ECCV 2022) in JAX/Flax."""

__version__ = "0.1.0"
