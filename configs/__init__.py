"""Experiment configs (ml_collections), one ``get_config()`` per file; shared defaults in
``lipflow_jax.config_base``."""
