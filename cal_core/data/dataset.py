"""``ShardDataset``: training and evaluation samples from low-resolution parquet shards.

A map-style torch dataset (one index per person instance, in manifest order)
over a shard set written by ``cal-pose downsample`` (local folder or
``s3://`` prefix; docs/architecture.md, "Shard format"). Per sample it decodes
the stored JPEG crop, applies the train-time augmentation as one affine
(:mod:`cal_core.data.augment`; none in eval mode) and normalises with the
ImageNet ``MEAN``/``STD``; it returns the keypoints in input pixels. The
codec's training targets are built per batch on the training device by
:func:`add_targets`.

Shuffling and sharding over DDP ranks and DataLoader workers is the sampler's
job (``cal_core.distributed.EpochBatchSampler`` gives every rank a disjoint
slice of one seeded global permutation, so across ranks x workers every
sample is seen exactly once per epoch, and shards are mixed). Augmentation
draws from a generator seeded by ``(seed, epoch, index)``, so a sample's
augmentation does not depend on which worker or rank produced it and a
resumed run sees the same data.

Memory: shards are held decoded-from-parquet (JPEG bytes plus small label
arrays) in a per-process LRU cache bounded by ``cache_bytes``. The leading
shards that fit are loaded in the constructor, so DataLoader workers forked
later share those pages instead of each reading them again. A set that does
not fit is loaded on demand and evicted least-recently-used; a uniform
shuffle would then reload a whole shard for most samples, so training
shuffles within windows of :attr:`ShardDataset.window` shards instead
(``EpochBatchSampler``'s ``blocks``): each shard is read about once per
epoch and process.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import operator
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from cal_core import storage
from cal_core.codecs.base import Codec
from cal_core.data.augment import AugmentConfig, sample_transform, warp_sample
from cal_core.geometry import compose_affine, invert_affine
from cal_core.models import MEAN, STD
from cal_core.skeleton import NUM_KEYPOINTS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Default per-process bound on cached shard data (bytes).
DEFAULT_CACHE_BYTES = 2 << 30
_COLUMNS = ("image_id", "ann_id", "crop", "keypoints", "crop_to_image", "bbox", "area", "score")


class ShardFormatError(ValueError):
    """A manifest or shard that does not follow the shard format; the message names the file."""


@dataclass(frozen=True)
class _Shard:
    """One shard's rows as flat arrays: JPEG bytes (zero-copy slices) and labels."""

    jpeg_offsets: np.ndarray  # (n + 1,) int64
    jpeg_data: np.ndarray  # uint8 buffer of all crops
    keypoints: np.ndarray  # (n, 17, 3) float32, crop px
    crop_to_image: np.ndarray  # (n, 2, 3) float64
    bbox: np.ndarray  # (n, 4) float32
    area: np.ndarray  # (n,) float32
    score: np.ndarray  # (n,) float32
    image_id: np.ndarray  # (n,) int64
    ann_id: np.ndarray  # (n,) int64

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(self, name).nbytes) for name in self.__dataclass_fields__)

    def jpeg(self, row: int) -> np.ndarray:
        return self.jpeg_data[self.jpeg_offsets[row] : self.jpeg_offsets[row + 1]]


def _flat(table: pa.Table, name: str, width: int, dtype: type, uri: str) -> np.ndarray:
    """A list column of fixed length ``width`` as an ``(n, width)`` array; errors name the shard."""
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if values.size != width * len(table) or column.null_count:
        raise ShardFormatError(f"{uri}: column {name!r} must hold {width} values per row")
    return values.reshape(len(table), width)


def _parse_shard(table: pa.Table, uri: str) -> _Shard:
    """Columns of a shard table as numpy arrays (the crop column stays one contiguous buffer)."""
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise ShardFormatError(f"{uri}: missing columns {missing}")
    crops = table.column("crop").combine_chunks()
    if pa.types.is_binary(crops.type):
        crops = crops.cast(pa.large_binary())
    if not pa.types.is_large_binary(crops.type) or crops.null_count:
        raise ShardFormatError(f"{uri}: column 'crop' must be non-null binary, got {crops.type}")
    _, offsets, data = crops.buffers()
    n = len(table)
    offsets_np = np.frombuffer(offsets, np.int64, count=n + 1, offset=crops.offset * 8)
    scalars = {c: table.column(c).to_numpy() for c in ("area", "score", "image_id", "ann_id")}
    return _Shard(
        jpeg_offsets=offsets_np,
        jpeg_data=np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8),
        keypoints=_flat(table, "keypoints", NUM_KEYPOINTS * 3, np.float32, uri).reshape(n, NUM_KEYPOINTS, 3),
        crop_to_image=_flat(table, "crop_to_image", 6, np.float64, uri).reshape(n, 2, 3),
        bbox=_flat(table, "bbox", 4, np.float32, uri),
        area=scalars["area"].astype(np.float32),
        score=scalars["score"].astype(np.float32),
        image_id=scalars["image_id"].astype(np.int64),
        ann_id=scalars["ann_id"].astype(np.int64),
    )


def read_manifest(uri: str) -> dict[str, Any]:
    """The shard set's ``manifest.json``, checked for the fields the loader needs."""
    path = storage.join(uri, "manifest.json")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (OSError, storage.StorageError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{path}: cannot read the shard manifest ({exc})") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{path}: schema_version {manifest.get('schema_version')!r}, this loader reads {SCHEMA_VERSION}"
        )
    for key in ("input_size", "margin", "shards"):
        if key not in manifest:
            raise ShardFormatError(f"{path}: missing {key!r}")
    return manifest


def _blob_params() -> cv2.dnn.Image2BlobParams:
    """One-call BGR uint8 HWC -> normalised RGB float32 NCHW: ``(x - 255 MEAN) / (255 STD)``."""
    return cv2.dnn.Image2BlobParams(
        scalefactor=tuple(1.0 / (255.0 * s) for s in STD),
        mean=tuple(255.0 * m for m in MEAN),
        swapRB=True,
        ddepth=cv2.CV_32F,
    )


_BLOB = _blob_params()


def normalise(image_bgr: np.ndarray) -> torch.Tensor:
    """A BGR uint8 ``(H, W, 3)`` image as the network input: RGB, ``(x / 255 - MEAN) / STD``, ``(3, H, W)``."""
    return torch.from_numpy(cv2.dnn.blobFromImageWithParams(image_bgr, _BLOB)[0])


def fork_safe_opencv(workers: int) -> None:
    """Stop OpenCV's own thread pool before DataLoader workers are forked.

    A worker forked after this process used cv2 (validation, in-process
    downsampling) inherits a dead cv2 thread pool and hangs in its first
    warpAffine. Per-sample crops are tiny; cv2 threads bring nothing there.
    """
    if workers > 0:
        cv2.setNumThreads(1)


def add_targets(batch: dict[str, Any], codec: Codec) -> dict[str, Any]:
    """``batch`` plus the codec's training targets, built on the device the keypoints are on.

    Adds ``"targets"`` (the codec's dict of ``(N, K, h, w)`` maps), ``"weights"``
    ``(N, K)`` and ``"joints_hm"`` ``(N, K, 2)`` (sub-pixel joints in heatmap px,
    for the MGMs of Eqs. 11-13). Targets are not built per sample in the loader:
    for a batch they are megabytes that a GPU makes in microseconds from the
    keypoints, while the CPU loader would have to build and ship them.
    """
    keypoints, visibility = batch["keypoints"], batch["visibility"]
    targets, weights = codec.encode_torch(keypoints, visibility)
    joints_hm = codec.input_to_heatmap_torch(keypoints).float()
    return {**batch, "targets": targets, "weights": weights, "joints_hm": joints_hm}


class ShardDataset(Dataset):
    """Person instances of a shard set as network-ready samples (see the module docstring).

    ``train=True`` applies ``augment`` (default: the authors' settings,
    :class:`~cal_core.data.augment.AugmentConfig`); ``train=False`` maps the
    padded box onto the input unchanged and adds ``"meta"`` for evaluation.
    The codec's input size must be the shard set's.
    """

    def __init__(
        self,
        uri: str,
        codec: Codec,
        train: bool,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        from cal_core.codecs import parse_size

        self.uri, self.codec, self.train, self.seed = str(uri), codec, bool(train), int(seed)
        self.manifest = read_manifest(self.uri)
        self.input_size = parse_size(self.manifest["input_size"])
        if tuple(codec.input_size) != self.input_size:
            raise ValueError(
                f"codec input size {codec.input_size} != shard set {self.uri} input size {self.input_size}"
            )
        self.margin = float(self.manifest["margin"])
        self.augment = (augment or AugmentConfig()) if self.train else None
        self.epoch = 0
        self.cache_bytes = int(cache_bytes)
        self._shards = list(self.manifest["shards"])
        self._starts = np.concatenate([[0], np.cumsum([int(s["rows"]) for s in self._shards])]).tolist()
        self._cache: OrderedDict[int, _Shard] = OrderedDict()
        self._cached_bytes = 0
        self._preload()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws are used (call before building the DataLoader)."""
        self.epoch = int(epoch)

    def ann_ids(self) -> np.ndarray:
        """``(len(self),)`` int64 annotation id of every sample, in index order (-1: a detector box)."""
        return np.concatenate([np.zeros(0, np.int64)] + [self._shard(i).ann_id for i in range(len(self._shards))])

    @property
    def shard_starts(self) -> list[int]:
        """Index of each shard's first sample, then ``len(self)``: the blocks a windowed shuffle keeps together."""
        return list(self._starts)

    def _preload(self) -> None:
        """Load the leading shards that fit the cache together (shared by forked DataLoader workers).

        Sets :attr:`window`, how many shards fit at once (all of them when the
        set fits), from the largest shard seen.
        """
        self.window = len(self._shards)
        largest = 0
        for i in range(len(self._shards)):
            shard = self._load(i)
            largest = max(largest, shard.nbytes)
            if self._cached_bytes + shard.nbytes > self.cache_bytes:
                self.window = max(1, int(self.cache_bytes // largest))
                log.info("%s: %d of %d shards fit the %.1f GiB cache; training shuffles within windows of %d "
                         "shards", self.uri, i, len(self._shards), self.cache_bytes / 2**30, self.window)
                return
            self._cache[i] = shard
            self._cached_bytes += shard.nbytes

    def _shard(self, i: int) -> _Shard:
        """Shard ``i`` from the LRU cache, loading (and evicting least-recently-used) as needed."""
        shard = self._cache.get(i)
        if shard is not None:
            self._cache.move_to_end(i)
            return shard
        shard = self._load(i)
        while self._cache and self._cached_bytes + shard.nbytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        self._cache[i] = shard
        self._cached_bytes += shard.nbytes
        return shard

    def _load(self, i: int) -> _Shard:
        """Read, verify (sha256, row count) and parse shard ``i``."""
        entry = self._shards[i]
        uri = storage.join(self.uri, entry["path"])
        data = storage.read_bytes(uri)
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ShardFormatError(f"{uri}: sha256 differs from the manifest (corrupt or partial shard)")
        try:
            table = pq.read_table(pa.BufferReader(data), columns=list(_COLUMNS))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardFormatError(f"{uri}: not a readable parquet shard ({exc})") from exc
        if len(table) != int(entry["rows"]):
            raise ShardFormatError(f"{uri}: {len(table)} rows, manifest says {entry['rows']}")
        return _parse_shard(table, uri)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)  # numpy/torch integers too: the augmentation seed needs a Python int
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples in {self.uri}")
        shard_i = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard_i]
        shard = self._shard(shard_i)
        crop = cv2.imdecode(shard.jpeg(row), cv2.IMREAD_COLOR)
        if crop is None:
            raise ShardFormatError(
                f"{storage.join(self.uri, self._shards[shard_i]['path'])} row {row} "
                f"(ann_id {shard.ann_id[row]}): crop is not a decodable JPEG"
            )
        kp = shard.keypoints[row]
        rng = random.Random((self.seed << 64) + (self.epoch << 32) + index) if self.augment else None
        matrix, flipped = sample_transform(
            rng,
            kp[:, :2],
            kp[:, 2],
            (crop.shape[1], crop.shape[0]),
            self.margin,
            self.input_size,
            self.augment,
        )
        image, points, vis = warp_sample(crop, kp[:, :2], kp[:, 2], matrix, flipped, self.input_size)
        sample: dict[str, Any] = {
            "image": normalise(image),
            "keypoints": torch.from_numpy(points),
            "visibility": torch.from_numpy(vis),
            "index": index,
        }
        if not self.train:
            sample["meta"] = self._meta(shard, row, matrix)
        return sample

    @staticmethod
    def _meta(shard: _Shard, row: int, crop_to_input: np.ndarray) -> dict[str, Any]:
        """What evaluation needs: ids, box, score, area and the input -> original image affine."""
        return {
            "image_id": int(shard.image_id[row]),
            "ann_id": int(shard.ann_id[row]),
            "input_to_image": torch.from_numpy(
                compose_affine(shard.crop_to_image[row], invert_affine(crop_to_input))
            ),
            "bbox": torch.from_numpy(shard.bbox[row].copy()),
            "score": float(shard.score[row]),
            "area": float(shard.area[row]),
        }
