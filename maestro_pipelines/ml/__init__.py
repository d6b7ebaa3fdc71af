"""The ML work itself, without Dagster: features, training, evaluation, the MLflow registry.

The assets in `maestro_pipelines/assets/ml.py` call these functions; a plain script (the
benchmark's baseline) can call them too. scikit-learn, pandas, matplotlib and MLflow are
imported inside the modules here, which Dagster's definitions never import at load time.
"""
