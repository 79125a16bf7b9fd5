"""KFP components: one lightweight Python component per pipeline stage.

Each component is thin: it turns its typed inputs into a ``cal-pose`` command
line, runs it in-process (``components.runtime.run_stage``) and writes its KFP
outputs. All logic lives in ``cal_core``. The base image of each component is
its stage image (``components.images``); kfp is preinstalled there, so
components use ``install_kfp_package=False`` and run unchanged in a cluster,
under ``kfp.local.SubprocessRunner`` and under ``kfp.local.DockerRunner``.
"""
