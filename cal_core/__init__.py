"""cal-pose: low-resolution human pose estimation with Confidence-Aware Learning (CAL).

The library behind every pipeline stage. It never imports kfp; mlflow only in
``tracking.py`` and minio only in ``storage.py`` (see docs/architecture.md).
"""

__version__ = "0.1.0"
