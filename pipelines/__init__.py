"""The Kubeflow pipeline: DAG, compiler, local runner, and kfp.Client submit/schedule helpers."""
