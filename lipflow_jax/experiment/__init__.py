"""The main job's experiment: ``pipeline.run(config, workdir)`` (data -> train -> tune -> fit ->
evaluate -> report), with the validation-split tuning (``tuning``), the figures (``figures``) and
the workdir's caches and fingerprints (``workdir``)."""

from lipflow_jax.experiment.pipeline import run

__all__ = ["run"]
