"""Experiment configs (ml_collections), one ``get_config()`` per file; shared defaults in ``common``."""
