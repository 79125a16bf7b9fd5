"""Data: COCO reading (``coco``), anti-aliased crops (``crops``), the shard format (``shards``),
the ``cal-pose downsample`` stage (``downsample``), synthetic people, augmentation and the shard dataset.

Submodules are imported on use, so ``import cal_core.data`` stays cheap.
"""
