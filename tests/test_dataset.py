"""ShardDataset: labels map back to the image, pixels are faithful, each sample once per epoch, errors.

The shard sets here are written by a small independent writer that follows
the shard format of docs/architecture.md (crop = padded box x margin, UDP
affine, JPEG q95), so the loader is checked against the contract, not against
the downsampler's code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from cal_core.codecs import build_codec
from cal_core.data import synthetic
from cal_core.data.dataset import ShardDataset, ShardFormatError, add_targets
from cal_core.distributed import EpochBatchSampler
from cal_core.geometry import box_to_center_size, invert_affine, warp_matrix
from cal_core.models import MEAN, STD
from tests.s3server import s3_server  # noqa: F401  (pytest fixture)

INPUT = (64, 48)
MARGIN = 1.5


def _rows(coco_root: Path, input_size: tuple[int, int]) -> list[dict]:
    """One shard row per labelled synthetic person (train split), per the shard format."""
    data = json.loads((coco_root / "annotations/person_keypoints_train2017.json").read_text())
    images = {img["id"]: img for img in data["images"]}
    height, width = input_size
    crop_wh = (round(MARGIN * width), round(MARGIN * height))
    rows = []
    for ann in data["annotations"]:
        if ann["num_keypoints"] == 0:
            continue
        img = images[ann["image_id"]]
        pixels = cv2.imread(str(coco_root / "train2017" / img["file_name"]))
        center, size = box_to_center_size(ann["bbox"], width / height)
        to_crop = warp_matrix(center, size * MARGIN, 0.0, crop_wh)
        crop = cv2.warpAffine(pixels, to_crop, crop_wh, flags=cv2.INTER_AREA)
        kp = np.asarray(ann["keypoints"], dtype=np.float64).reshape(17, 3)
        kp[:, :2] = kp[:, :2] @ to_crop[:, :2].T + to_crop[:, 2]
        kp[kp[:, 2] == 0] = 0
        rows.append({
            "image_id": ann["image_id"], "ann_id": ann["id"], "file_name": img["file_name"],
            "crop": cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
            "crop_height": crop_wh[1], "crop_width": crop_wh[0],
            "keypoints": kp.ravel().astype(np.float32).tolist(),
            "crop_to_image": invert_affine(to_crop).ravel().tolist(), "bbox": ann["bbox"],
            "area": ann["area"], "score": 1.0, "num_keypoints": ann["num_keypoints"],
        })  # fmt: skip
    return rows


def write_shard_set(coco_root: Path, out: Path, input_size: tuple[int, int], shard_size: int) -> Path:
    """Parquet shards + manifest.json of the synthetic train split at ``input_size``."""
    out.mkdir(parents=True)
    rows = _rows(coco_root, input_size)
    shards = []
    for start in range(0, len(rows), shard_size):
        name = f"shard-{start // shard_size:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[start : start + shard_size]), out / name, compression="zstd")
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        shards.append({"path": name, "rows": len(rows[start : start + shard_size]), "sha256": digest})
    manifest = {
        "schema_version": 1,
        "split": "train",
        "input_size": list(input_size),
        "margin": MARGIN,
        "crop_size": [round(MARGIN * input_size[0]), round(MARGIN * input_size[1])],
        "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, 40, 0, seed=5)
    return root


@pytest.fixture(scope="module")
def shard_set(coco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shard_set(coco_root, tmp_path_factory.mktemp("shards") / "64x48", INPUT, shard_size=12)


def _original_keypoints(coco_root: Path) -> dict[int, np.ndarray]:
    data = json.loads((coco_root / "annotations/person_keypoints_train2017.json").read_text())
    return {a["id"]: np.asarray(a["keypoints"], dtype=np.float64).reshape(17, 3) for a in data["annotations"]}


def test_eval_sample_fields_and_keypoints_map_back_to_the_image(coco_root: Path, shard_set: Path) -> None:
    codec = build_codec("cal", INPUT)
    dataset = ShardDataset(str(shard_set), codec, train=False)
    original = _original_keypoints(coco_root)
    assert len(dataset) == sum(1 for kp in original.values() if (kp[:, 2] > 0).any())
    checked = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image"].shape == (3, *INPUT) and sample["image"].dtype == torch.float32
        batch = add_targets(default_collate([sample]), codec)
        assert set(batch["targets"]) == {"heatmap", "offset"}
        assert batch["targets"]["offset"].shape == (1, 17, 2, *codec.heatmap_size)
        meta = sample["meta"]
        truth = original[meta["ann_id"]]
        input_px = batch["joints_hm"][0].numpy() * codec.stride
        np.testing.assert_allclose(input_px, sample["keypoints"].numpy(), rtol=1e-6)
        image_px = input_px @ meta["input_to_image"].numpy()[:, :2].T + meta["input_to_image"].numpy()[:, 2]
        labelled = batch["weights"][0].numpy() > 0
        assert not labelled[truth[:, 2] == 0].any()
        np.testing.assert_allclose(image_px[labelled], truth[labelled, :2], atol=1e-3)
        checked += labelled.sum()
    assert checked > 100


def test_eval_pixels_are_a_faithful_resampling_of_the_original(coco_root: Path, shard_set: Path) -> None:
    dataset = ShardDataset(str(shard_set), build_codec("heatmap", INPUT), train=False)
    data = json.loads((coco_root / "annotations/person_keypoints_train2017.json").read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    for i in (0, 7, 19):
        sample = dataset[i]
        rgb = (sample["image"].numpy().transpose(1, 2, 0) * STD + MEAN) * 255.0
        original = cv2.imread(str(coco_root / "train2017" / files[sample["meta"]["image_id"]]))[..., ::-1]
        to_input = invert_affine(sample["meta"]["input_to_image"].numpy())
        errors = []
        for shift in (0.0, 1.0):  # the true mapping, and one 1 input px off
            moved = to_input + [[0, 0, shift], [0, 0, shift]]
            expected = cv2.warpAffine(original, moved, INPUT[::-1], flags=cv2.INTER_AREA).astype(np.float64)
            errors.append(np.abs(rgb - expected).mean())
        assert errors[0] < 8.0 and errors[0] < 0.7 * errors[1]


def test_train_augmentation_is_seeded_by_epoch_and_index(shard_set: Path) -> None:
    dataset = ShardDataset(str(shard_set), build_codec("udp", INPUT), train=True, seed=1)
    first, again = dataset[3], dataset[3]
    assert "meta" not in first
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["keypoints"], again["keypoints"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3]["image"], first["image"])


def test_each_sample_once_per_epoch_over_two_ranks_and_two_workers(shard_set: Path) -> None:
    dataset = ShardDataset(str(shard_set), build_codec("heatmap", INPUT), train=True, seed=2)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen, first_batches = [], []
        for rank in (0, 1):
            sampler = EpochBatchSampler(len(dataset), 4, rank, 2, seed=2)
            sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
            batches = [batch["index"].tolist() for batch in loader]
            first_batches.append(batches[0])
            seen += [i for batch in batches for i in batch]
        assert sorted(seen) == list(range(len(dataset)))
        assert len({i // 12 for batch in first_batches for i in batch}) > 1  # batches mix shards


def test_batch_targets_equal_per_sample_encoding(shard_set: Path) -> None:
    dataset = ShardDataset(str(shard_set), build_codec("cal", INPUT), train=True, seed=4)
    samples = [dataset[i] for i in range(6)]
    batch = add_targets(next(iter(DataLoader(dataset, batch_size=6))), dataset.codec)
    assert batch["targets"]["heatmap"].shape == (6, 17, *dataset.codec.heatmap_size)
    for i, sample in enumerate(samples):
        targets, weights = dataset.codec.encode(sample["keypoints"].numpy(), sample["visibility"].numpy())
        np.testing.assert_array_equal(batch["weights"][i].numpy(), weights)
        np.testing.assert_allclose(batch["joints_hm"][i].numpy() * dataset.codec.stride, sample["keypoints"].numpy(),
                                   rtol=1e-6)
        for name, value in targets.items():
            np.testing.assert_array_equal(batch["targets"][name][i].numpy(), value)


def test_default_collate_batches_eval_meta(shard_set: Path) -> None:
    dataset = ShardDataset(str(shard_set), build_codec("dark", INPUT), train=False)
    batch = next(iter(DataLoader(dataset, batch_size=5)))
    assert batch["image"].shape == (5, 3, *INPUT)
    assert batch["meta"]["input_to_image"].shape == (5, 2, 3)
    assert batch["meta"]["bbox"].shape == (5, 4) and batch["meta"]["image_id"].shape == (5,)


def test_cache_stays_bounded_and_gives_the_same_samples(shard_set: Path) -> None:
    codec = build_codec("heatmap", INPUT)
    full = ShardDataset(str(shard_set), codec, train=False)
    small = ShardDataset(str(shard_set), codec, train=False, cache_bytes=1)
    assert len(small._cache) == 0 and small.window == 1  # no shard fits: none is kept from the constructor
    for i in (0, len(full) - 1, 13, 2):
        assert torch.equal(small[i]["image"], full[i]["image"])
        assert len(small._cache) == 1
    assert len(full._cache) == len(full.manifest["shards"])


def test_numpy_and_torch_integer_indices_give_the_same_training_sample(shard_set: Path) -> None:
    """The augmentation seed is built from the index: a numpy or torch integer once raised TypeError there."""
    dataset = ShardDataset(str(shard_set), build_codec("cal", INPUT), train=True, seed=1)
    dataset.set_epoch(2)
    want = dataset[3]["image"]
    assert torch.equal(dataset[np.int64(3)]["image"], want) and torch.equal(dataset[torch.tensor(3)]["image"], want)


def test_a_set_larger_than_the_cache_reads_each_shard_about_once_per_epoch(shard_set: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A uniform shuffle over a set the cache cannot hold reloads a shard for most samples; windows do not."""
    codec = build_codec("heatmap", INPUT)
    full = ShardDataset(str(shard_set), codec, train=True)
    shards = len(full.manifest["shards"])
    largest = max(shard.nbytes for shard in full._cache.values())
    small = ShardDataset(str(shard_set), codec, train=True, cache_bytes=int(2.5 * largest))
    assert small.window == 2 and sorted(small._cache) == [0, 1]  # the leading shards that fit, no eviction
    loads = []
    original = ShardDataset._load
    monkeypatch.setattr(ShardDataset, "_load", lambda self, i: loads.append(i) or original(self, i))

    def epoch_loads(**windowing) -> int:
        loads.clear()
        sampler = EpochBatchSampler(len(small), 4, seed=5, **windowing)
        sampler.set_epoch(1)
        for batch in sampler:
            for i in batch:
                small[i]
        return len(loads)

    windowed = epoch_loads(blocks=small.shard_starts, window=small.window)
    assert windowed <= shards, windowed  # each shard read at most once (the first two may still be cached)
    assert epoch_loads() > 2 * shards  # the uniform shuffle it replaces


def test_bad_inputs_fail_with_the_file_named(shard_set: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input size"):
        ShardDataset(str(shard_set), build_codec("cal", (128, 96)), train=False)
    with pytest.raises(ShardFormatError, match="manifest"):
        ShardDataset(str(tmp_path), build_codec("cal", INPUT), train=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in shard_set.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    shard = broken / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardFormatError, match="shard-00001.parquet: sha256"):
        ShardDataset(str(broken), build_codec("cal", INPUT), train=False)


def test_reads_the_real_downsampling_stage_output(coco_root: Path, tmp_path: Path) -> None:
    """End to end with ``cal_core.data.downsample``: every labelled joint maps back to its annotation."""
    from cal_core.data.downsample import downsample

    downsample(str(coco_root), "train", str(tmp_path), ["64x48"], workers=1, progress=False)
    codec = build_codec("udp", INPUT)
    dataset = ShardDataset(str(tmp_path / "64x48"), codec, train=False)
    original = _original_keypoints(coco_root)
    assert len(dataset) == sum(1 for kp in original.values() if (kp[:, 2] > 0).any())
    for i in range(len(dataset)):
        sample = dataset[i]
        truth, to_image = original[sample["meta"]["ann_id"]], sample["meta"]["input_to_image"].numpy()
        image_px = sample["keypoints"].numpy() @ to_image[:, :2].T + to_image[:, 2]
        labelled = codec.joint_labels(sample["keypoints"], sample["visibility"])[1].numpy() > 0
        np.testing.assert_allclose(image_px[labelled], truth[labelled, :2], atol=1e-2)
    train = ShardDataset(str(tmp_path / "64x48"), codec, train=True)
    assert train[0]["image"].shape == (3, *INPUT)


def test_reads_shards_from_s3_like_local(shard_set: Path, s3_server) -> None:  # noqa: F811
    from cal_core import storage

    remote = f"s3://{s3_server.bucket}/shards/64x48"
    for path in shard_set.iterdir():
        storage.upload(path, f"{remote}/{path.name}")
    codec = build_codec("cal", INPUT)
    local, s3 = ShardDataset(str(shard_set), codec, train=False), ShardDataset(remote, codec, train=False)
    assert len(s3) == len(local)
    for i in (0, len(local) - 1):
        assert torch.equal(s3[i]["image"], local[i]["image"])
        assert s3[i]["meta"]["ann_id"] == local[i]["meta"]["ann_id"]
