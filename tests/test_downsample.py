"""cal-pose downsample: COCO rules, exact keypoints, faithful pixels, skips, resume and idempotence.

Expected values are computed here from the COCO JSON and from an independent
pixel reference (full-resolution OpenCV decode, 8x supersampled exact region,
area averaging), never from the code under test.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from cal_core import storage
from cal_core.data import coco, crops, downsample, shards
from tests.s3server import s3_server  # noqa: F401  (pytest fixture)

SIZES = ["64x48", "256x192"]


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def _rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of a local shard set, in order, read through the public readers."""
    rows: list[dict[str, Any]] = []
    manifest = shards.read_manifest(str(folder))
    for entry, uri in zip(manifest["shards"], shards.shard_uris(str(folder)), strict=True):
        rows += shards.read_shard(uri, entry).to_pylist()
    return rows


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full(coco_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """coco-mini downsampled once per split (val at two sizes in one run, train at 64x48)."""
    out = tmp_path_factory.mktemp("full")
    downsample.downsample(str(coco_mini), "val", str(out / "val"), SIZES, shard_size=50, workers=1,
                          progress=False)
    downsample.downsample(str(coco_mini), "train", str(out / "train"), ["64x48"], shard_size=50, workers=1,
                          progress=False)
    return {"val": out / "val", "train": out / "train"}


@pytest.mark.parametrize("split", ["train", "val"])
def test_counts_follow_coco_rules(full: dict[str, Path], coco_mini: Path, split: str) -> None:
    gt = json.loads((coco_mini / "annotations" / f"person_keypoints_{split}2017.json").read_text())
    people = [a for a in gt["annotations"] if a["category_id"] == 1 and not a["iscrowd"]]
    if split == "train":
        people = [a for a in people if any(v > 0 for v in a["keypoints"][2::3])]
    expected_ids = sorted(a["id"] for a in people)
    expected_images = {a["image_id"] for a in people}
    folder = full[split] / "64x48"
    manifest = _manifest(folder)
    rows = _rows(folder)
    assert sorted(r["ann_id"] for r in rows) == expected_ids
    assert [(r["image_id"], r["ann_id"]) for r in rows] == sorted((a["image_id"], a["id"]) for a in people)
    assert manifest["counts"]["instances"] == len(expected_ids) == sum(e["rows"] for e in manifest["shards"])
    assert manifest["counts"]["images"] == len(expected_images)
    assert manifest["counts"]["skipped"] == {} and manifest["skipped"] == []
    assert manifest["counts"]["excluded"]["crowd"] == sum(a["iscrowd"] for a in gt["annotations"])
    assert all(e["rows"] == 50 for e in manifest["shards"][:-1]) and manifest["shards"][-1]["rows"] <= 50
    subset = json.loads((folder / "annotations.json").read_text())
    assert {img["id"] for img in subset["images"]} == expected_images
    assert {a["id"] for a in subset["annotations"]} == {a["id"] for a in gt["annotations"]
                                                         if a["image_id"] in expected_images}
    assert manifest["input_size"] == [64, 48] and manifest["crop_size"] == [96, 72]


@pytest.mark.parametrize("size, crop_hw", [("256x192", (384, 288)), ("64x48", (96, 72))])
def test_keypoints_map_back_exactly(full: dict[str, Path], coco_mini: Path, size: str,
                                    crop_hw: tuple[int, int]) -> None:
    gt = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    by_id = {a["id"]: np.asarray(a["keypoints"], np.float64).reshape(17, 3) for a in gt["annotations"]}
    rows = _rows(full["val"] / size)
    assert rows and all((r["crop_height"], r["crop_width"]) == crop_hw for r in rows)
    # both sizes came from one run (one decode per image): same people, same order
    assert [(r["image_id"], r["ann_id"]) for r in rows] == \
        [(r["image_id"], r["ann_id"]) for r in _rows(full["val"] / "64x48")]
    worst = 0.0
    for row in rows:
        kp = np.asarray(row["keypoints"], np.float64).reshape(17, 3)
        original = by_id[row["ann_id"]]
        assert np.array_equal(kp[:, 2], original[:, 2])
        assert row["num_keypoints"] == int((original[:, 2] > 0).sum())
        labelled = original[:, 2] > 0
        assert np.all(kp[~labelled] == 0)
        m = np.asarray(row["crop_to_image"], np.float64).reshape(2, 3)
        back = kp[labelled, :2] @ m[:, :2].T + m[:, 2]
        if labelled.any():
            worst = max(worst, float(np.abs(back - original[labelled, :2]).max()))
    assert worst < 1e-3  # float32 storage only, at any size; far inside the required 0.5 px


def _reference(image: np.ndarray, crop_to_image: np.ndarray, crop_wh: tuple[int, int], factor: int = 8) -> np.ndarray:
    """Area-average of the exact region each crop pixel covers: 8x supersampled warp + INTER_AREA."""
    to_crop = cv2.invertAffineTransform(crop_to_image)
    fine = np.concatenate([factor * to_crop[:, :2], (factor * to_crop[:, 2] + (factor - 1) / 2)[:, None]], 1)
    big = cv2.warpAffine(image, fine, (crop_wh[0] * factor, crop_wh[1] * factor), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT)
    return cv2.resize(big, crop_wh, interpolation=cv2.INTER_AREA)


def test_low_res_crop_is_a_faithful_downscale(full: dict[str, Path], coco_mini: Path) -> None:
    ours, naive, checked = [], [], 0
    for row in _rows(full["val"] / "64x48"):
        m = np.asarray(row["crop_to_image"], np.float64).reshape(2, 3)
        step = float(np.linalg.norm(m[:, 0]))  # source pixels per crop pixel
        if step < 2.5:
            continue  # barely reduced: any interpolation is faithful here
        data = np.fromfile(coco_mini / "val2017" / row["file_name"], np.uint8)
        image = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32)
        crop_wh = (row["crop_width"], row["crop_height"])
        reference = _reference(image, m, crop_wh)
        stored = np.asarray(Image.open(io.BytesIO(row["crop"])).convert("RGB"), np.float32)
        plain = cv2.warpAffine(image, cv2.invertAffineTransform(m), crop_wh, flags=cv2.INTER_LINEAR)
        ours.append(float(np.abs(stored - reference).mean()))
        naive.append(float(np.abs(plain - reference).mean()))
        checked += 1
    assert checked >= 5
    print(f"mean abs diff to the reference: ours {np.mean(ours):.2f} (max {max(ours):.2f}), "
          f"plain bilinear {np.mean(naive):.2f} (max {max(naive):.2f}) over {checked} crops")
    # grey levels of 255, JPEG q95 included (it alone costs ~0.7 on crops this small)
    assert max(ours) < 7.0 and float(np.mean(ours)) < 3.5
    assert float(np.mean(ours)) < 0.75 * float(np.mean(naive))  # and clearly closer than plain bilinear


def test_decode_takes_the_coarsest_dct_scale_that_needs_no_upsampling(coco_mini: Path) -> None:
    data = sorted((coco_mini / "val2017").glob("*.jpg"))[0].read_bytes()
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    for min_step, scale in [(0.6, 1), (1.99, 1), (2.0, 2), (3.9, 2), (5.3, 4), (8.0, 8), (40.0, 8)]:
        decoded = crops.decode(data, min_step)
        width, height = decoded.size
        assert decoded.scale == scale and (height, width) == full.shape[:2]
        assert decoded.pixels.shape == (-(-height // scale), -(-width // scale), 3)  # BGR, libjpeg's ceil size
    assert np.array_equal(crops.decode(data, 1.0).pixels, full)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_decode_converts_grayscale_and_cmyk_jpegs_to_bgr(coco_mini: Path, mode: str) -> None:
    """Grayscale goes through libjpeg-turbo (reduced), CMYK through PIL (full size); both as PIL converts them."""
    image = Image.open(sorted((coco_mini / "val2017").glob("*.jpg"))[0]).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    decoded = crops.decode(buffer.getvalue(), 2.0)
    expected_scale = 2 if mode == "L" else 1
    assert decoded.scale == expected_scale and decoded.size == image.size
    if mode == "CMYK":
        reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))[:, :, ::-1]
        assert np.array_equal(decoded.pixels, reference)
    else:
        gray = decoded.pixels
        assert gray.shape[2] == 3 and np.array_equal(gray[..., 0], gray[..., 2])


def test_decode_names_what_is_wrong_with_broken_bytes(coco_mini: Path) -> None:
    data = sorted((coco_mini / "val2017").glob("*.jpg"))[0].read_bytes()
    for broken, why in [(data[: len(data) // 2], "truncated"),
                        (b"not an image", r"not an image format PIL knows: 12 bytes starting b'not an i'"),
                        (b"", "not an image format PIL knows: an empty file")]:  # was PIL's "<_io.BytesIO at 0x..>"
        with pytest.raises(crops.ImageDecodeError, match=why):
            crops.decode(broken, 4.0)


@pytest.mark.parametrize("fmt", ["PNG", "PCX"])  # PCX: a format OpenCV cannot read, so PIL decodes it
def test_decode_reads_other_formats_at_full_size(fmt: str) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt)
    decoded = crops.decode(buffer.getvalue(), 8.0)
    assert decoded.scale == 1 and decoded.size == (30, 20)
    assert np.array_equal(decoded.pixels, rgb[:, :, ::-1])


@pytest.mark.parametrize("fmt", [".png", ".tiff"])
def test_decode_scales_16_bit_grayscale_to_its_high_byte(fmt: str) -> None:
    """16-bit gray reads as OpenCV reads it (value >> 8), not clipped to white as PIL's convert("RGB") does."""
    gray = np.array([[0, 255, 256, 32768], [40000, 65535, 511, 12345]], dtype=np.uint16)
    ok, data = cv2.imencode(fmt, gray)
    assert ok
    decoded = crops.decode(data.tobytes(), 1.0)
    expected = np.array([[0, 0, 1, 128], [156, 255, 1, 48]], dtype=np.uint8)
    assert decoded.size == (4, 2)
    assert np.array_equal(decoded.pixels, np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.int32).reshape(2, 3) * 70000,
                                   np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)])
def test_decode_refuses_32_bit_samples_with_a_reason(array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "TIFF")
    with pytest.raises(crops.ImageDecodeError, match=r"^unsupported pixel format: PIL mode '(I|F)'"):
        crops.decode(buffer.getvalue(), 1.0)


def test_box_reduce_is_the_exact_block_mean_with_black_past_the_image_edge() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    left, top = 4, 3  # the box ends at the image edge, so the last blocks are partly outside
    for k in (2, 3, 5, 8):
        reduced = crops._box_reduce(pixels, (left, top, 50, 37), k)
        height, width = -(-(37 - top) // k) * k, -(-(50 - left) // k) * k
        padded = np.zeros((height, width, 3))
        padded[:37 - top, :50 - left] = pixels[top:, left:]
        expected = padded.reshape(height // k, k, width // k, k, 3).mean(axis=(1, 3))
        assert reduced.shape == expected.shape
        assert np.abs(reduced - expected).max() <= 1.0  # uint8 rounding


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _broken_root(coco_mini: Path, tmp: Path) -> tuple[Path, dict[int, str]]:
    """A val COCO root built from a few coco-mini people plus one broken record of each kind."""
    gt = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    people = [a for a in gt["annotations"] if not a["iscrowd"]]
    image_ids = list(dict.fromkeys(a["image_id"] for a in people))[:7]
    images = {i["id"]: dict(i) for i in gt["images"] if i["id"] in image_ids}
    anns = [dict(a) for a in people if a["image_id"] in image_ids]
    root = tmp / "coco"
    (root / "val2017").mkdir(parents=True)
    for img in images.values():
        shutil.copy(coco_mini / "val2017" / img["file_name"], root / "val2017" / img["file_name"])
    first = {i: next(a for a in anns if a["image_id"] == i) for i in image_ids}
    data = (root / "val2017" / images[image_ids[0]]["file_name"]).read_bytes()
    (root / "val2017" / images[image_ids[0]]["file_name"]).write_bytes(data[: len(data) // 2])  # truncated
    (root / "val2017" / images[image_ids[1]]["file_name"]).unlink()  # missing
    gray = root / "val2017" / images[image_ids[2]]["file_name"]
    Image.open(gray).convert("L").save(gray, "JPEG", quality=90)  # grayscale: converted, not skipped
    cmyk = root / "val2017" / images[image_ids[3]]["file_name"]
    Image.open(cmyk).convert("CMYK").save(cmyk, "JPEG", quality=90)  # CMYK: converted, not skipped
    first[image_ids[4]]["bbox"] = [10, 10, 0, 40]  # zero width
    first[image_ids[5]]["keypoints"] = first[image_ids[5]]["keypoints"][:-3]  # 16 joints
    img6 = images[image_ids[6]]
    first[image_ids[6]]["bbox"] = [img6["width"] + 5, 3, 20, 30]  # entirely outside the image
    expected = {first[image_ids[4]]["id"]: "bad_box", first[image_ids[5]]["id"]: "bad_keypoints",
                first[image_ids[6]]["id"]: "outside_image"}
    expected.update({a["id"]: "corrupt_image" for a in anns if a["image_id"] == image_ids[0]})
    expected.update({a["id"]: "missing_file" for a in anns if a["image_id"] == image_ids[1]})
    source = next(a for a in anns if a["image_id"] not in image_ids[:2] and max(a["keypoints"][2::3]) > 0
                  and all(a is not f for f in first.values()))
    nan_ann = dict(source, id=10**9)
    labelled = next(j for j, v in enumerate(nan_ann["keypoints"][2::3]) if v > 0)  # unlabelled ones may be NaN
    nan_ann["keypoints"] = [*nan_ann["keypoints"][:3 * labelled], float("nan"), *nan_ann["keypoints"][3 * labelled + 1:]]
    expected[nan_ann["id"]] = "bad_keypoints"
    far_ann = dict(source, id=10**9 + 1)  # finite in float64, inf in the float32 shard columns
    far_ann["keypoints"] = [*source["keypoints"][:3 * labelled], 1e40, *source["keypoints"][3 * labelled + 1:]]
    expected[far_ann["id"]] = "bad_keypoints"
    _write_json(root / "annotations" / "person_keypoints_val2017.json",
                {"images": list(images.values()), "annotations": [*anns, nan_ann, far_ann],
                 "categories": gt["categories"]})
    return root, expected


def test_broken_inputs_are_skipped_and_reported(coco_mini: Path, tmp_path: Path) -> None:
    root, expected = _broken_root(coco_mini, tmp_path)
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), ["64x48"], shard_size=4, workers=1, progress=False)
    manifest = _manifest(out / "64x48")
    assert {s["ann_id"]: s["reason"] for s in manifest["skipped"]} == expected
    details = {s["reason"]: s.get("detail", "") for s in manifest["skipped"]}  # why, for the image skips too
    assert "no such file" in details["missing_file"] and "truncated" in details["corrupt_image"].lower()
    reasons = list(expected.values())
    assert manifest["counts"]["skipped"] == {r: reasons.count(r) for r in set(reasons)}
    gt = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())
    kept = sorted(a["id"] for a in gt["annotations"] if a["id"] not in expected)
    assert sorted(r["ann_id"] for r in _rows(out / "64x48")) == kept  # grayscale and CMYK people included
    assert not [n for n in os.listdir(out / "64x48") if n.startswith(".") or n.startswith("_")]
    annotations = json.loads((out / "64x48" / "annotations.json").read_text())
    assert not {a["id"] for a in annotations["annotations"]} & set(expected)


def test_a_size_mismatch_of_a_turned_image_says_exif_is_ignored(coco_mini: Path, tmp_path: Path) -> None:
    root = _small_root(coco_mini, tmp_path, n_images=1)
    path = root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(path.read_text())
    turned = {**gt["images"][0], "width": gt["images"][0]["height"], "height": gt["images"][0]["width"]}
    _write_json(path, {**gt, "images": [turned]})
    with pytest.raises(downsample.DownsampleError, match=r"size_mismatch: .*\(turned: .*EXIF orientation is ignored"):
        downsample.downsample(str(root), "val", str(tmp_path / "out"), ["64x48"], workers=1, strict=True,
                              progress=False)


def test_strict_turns_a_skip_into_a_clear_error(coco_mini: Path, tmp_path: Path) -> None:
    root, expected = _broken_root(coco_mini, tmp_path)
    record = r"person_keypoints_val2017\.json: annotations\[\d+\]: image \d+ \(\d+\.jpg\), annotation \d+: "
    with pytest.raises(downsample.DownsampleError, match=record + "(bad_box|bad_keypoints|outside_image)"):
        downsample.downsample(str(root), "val", str(tmp_path / "out"), ["64x48"], workers=1, strict=True,
                              progress=False)
    assert not (tmp_path / "out").exists()  # annotation problems stop the run before anything is written
    # keep only image-level problems: the truncated JPEG must now be the error, naming the file
    ann_file = root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(ann_file.read_text())
    annotation_level = {"bad_box", "bad_keypoints", "outside_image"}
    gt["annotations"] = [a for a in gt["annotations"] if expected.get(a["id"]) not in annotation_level]
    _write_json(ann_file, gt)
    # images go in id order: the first broken one (truncated or missing) is the error, naming its file
    broken = {a["image_id"]: reason for a in gt["annotations"]
              if (reason := expected.get(a["id"])) in ("corrupt_image", "missing_file")}
    first = min(broken)
    name = next(i["file_name"] for i in gt["images"] if i["id"] == first)
    why = "truncated" if broken[first] == "corrupt_image" else "no such file"
    with pytest.raises(downsample.DownsampleError, match=rf"val2017/{name}: image {first} .*{broken[first]}.*{why}"):
        downsample.downsample(str(root), "val", str(tmp_path / "out"), ["64x48"], shard_size=2, workers=1,
                              strict=True, progress=False)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert not (tmp_path / "out" / "64x48" / "manifest.json").exists()


@pytest.mark.timeout(120)
def test_strict_error_stops_the_worker_pool(coco_mini: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root, expected = _broken_root(coco_mini, tmp_path)
    ann_file = root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(ann_file.read_text())
    gt["annotations"] = [a for a in gt["annotations"]
                         if expected.get(a["id"]) not in {"bad_box", "bad_keypoints", "outside_image"}]
    _write_json(ann_file, gt)
    monkeypatch.setattr(downsample, "IN_FLIGHT_PER_WORKER", 1)  # the feeder blocks on a full window
    with pytest.raises(downsample.DownsampleError, match="(corrupt_image|missing_file)"):
        downsample.downsample(str(root), "val", str(tmp_path / "out"), ["64x48"], workers=2, strict=True,
                              progress=False)


@pytest.mark.parametrize("content, why", [(b"{not json", "not valid JSON"), (b"[1, 2]", "not a COCO"),
                                          (b'{"images": [], "annotations": []}', "categories"), (None, "cannot read")])
def test_unreadable_annotation_file_names_the_file(tmp_path: Path, content: bytes | None, why: str) -> None:
    path = tmp_path / "annotations" / "person_keypoints_train2017.json"
    if content is not None:
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    with pytest.raises(coco.AnnotationFileError, match=rf"person_keypoints_train2017\.json.*{why}"):
        downsample.downsample(str(tmp_path), "train", str(tmp_path / "out"), ["64x48"], progress=False)


def test_json_bytes_compact_is_canonical_and_reads_back() -> None:
    data = {"b": [1, 2.5, None], "a": {"z": "x", "y": 1e-5}, "big": 2**70}  # 2**70: the stdlib fallback
    for value in (data, {k: v for k, v in data.items() if k != "big"}):
        raw = shards.json_bytes(value, compact=True)
        assert json.loads(raw) == value and raw.endswith(b"\n") and b" " not in raw
        assert list(json.loads(raw)) == sorted(value)


def test_read_json_accepts_what_the_stdlib_accepts(tmp_path: Path) -> None:
    """NaN literals (not JSON, but what json.dumps writes) still parse, so such records are skipped, not fatal."""
    path = tmp_path / "a.json"
    path.write_text('{"x": NaN, "y": [1, 2]}')
    data, raw = coco.read_json(str(path))
    assert math.isnan(data["x"]) and data["y"] == [1, 2] and raw == path.read_bytes()


def _small_root(coco_mini: Path, tmp: Path, n_images: int = 12) -> Path:
    """A val COCO root with the first ``n_images`` coco-mini images that have people (images symlinked)."""
    gt = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    ids = list(dict.fromkeys(a["image_id"] for a in gt["annotations"]))[:n_images]
    root = tmp / "small"
    (root / "val2017").mkdir(parents=True)
    images = [i for i in gt["images"] if i["id"] in ids]
    for img in images:
        (root / "val2017" / img["file_name"]).symlink_to(coco_mini / "val2017" / img["file_name"])
    _write_json(root / "annotations" / "person_keypoints_val2017.json",
                {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]})
    return root


def _odd_root(coco_mini: Path, tmp: Path) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    """A val root of 4 coco-mini images whose GT omits what other COCO exporters often omit."""
    root = _small_root(coco_mini, tmp, n_images=4)
    path = root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(path.read_text())
    for ann in gt["annotations"]:
        for key in ("iscrowd", "area", "num_keypoints", "segmentation"):
            ann.pop(key, None)
    return root, list(gt["annotations"]), gt


def test_annotations_json_is_complete_for_pycocotools_when_the_source_omits_fields(coco_mini: Path,
                                                                                   tmp_path: Path) -> None:
    """No iscrowd/area/num_keypoints in the source: annotations.json still evaluates (it once KeyError'd)."""
    from cal_core import evaluate

    root, anns, gt = _odd_root(coco_mini, tmp_path)
    gt["images"][0]["width"] = float(gt["images"][0]["width"])  # "640.0": an integer all the same
    _write_json(root / "annotations" / "person_keypoints_val2017.json", gt)
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), ["64x48"], workers=1, progress=False)
    written = json.loads((out / "64x48" / "annotations.json").read_text())
    assert len(written["images"]) == 4 and len(written["annotations"]) == len(anns)
    for ann in written["annotations"]:
        assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])
        assert ann["num_keypoints"] == sum(v > 0 for v in ann["keypoints"][2::3])
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in written["annotations"] if a["num_keypoints"]]
    metrics = evaluate.coco_keypoint_ap(out / "64x48" / "annotations.json", results)
    assert metrics["AP"] == pytest.approx(1.0)


def test_detection_runs_still_check_the_ground_truth(coco_mini: Path, tmp_path: Path) -> None:
    """With detections as boxes the GT still goes to annotations.json: its broken records are skipped too."""
    root, anns, gt = _odd_root(coco_mini, tmp_path)
    short, nan_box = anns[0], anns[1]
    short["keypoints"] = short["keypoints"][:-3]
    nan_box["bbox"] = [float("nan"), 1.0, 2.0, 3.0]
    _write_json(root / "annotations" / "person_keypoints_val2017.json", gt)
    dets = tmp_path / "dets.json"
    _write_json(dets, [{"image_id": a["image_id"], "category_id": 1, "bbox": [5, 5, 40, 80], "score": 0.9}
                       for a in anns[2:]])
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), ["64x48"], detections=str(dets), workers=1, progress=False)
    manifest = _manifest(out / "64x48")
    assert {(s["ann_id"], s["reason"]) for s in manifest["skipped"]} == {(short["id"], "bad_keypoints"),
                                                                         (nan_box["id"], "bad_box")}
    written = json.loads((out / "64x48" / "annotations.json").read_text())
    assert {a["id"] for a in written["annotations"]} == {a["id"] for a in anns[2:]}
    with pytest.raises(downsample.DownsampleError, match=r"person_keypoints_val2017\.json: .*(bad_keypoints|bad_box)"):
        downsample.downsample(str(root), "val", str(tmp_path / "strict"), ["64x48"], detections=str(dets),
                              workers=1, strict=True, progress=False)
    gt["annotations"] = anns[2:]  # a clean GT file: now the broken detection is the first skip, in dets.json
    _write_json(root / "annotations" / "person_keypoints_val2017.json", gt)
    _write_json(dets, [{"image_id": anns[2]["image_id"], "bbox": [5, 5, -4, 80], "score": 0.9}])
    with pytest.raises(downsample.DownsampleError, match=r"dets\.json: \[0\]: .*bad_box"):
        downsample.downsample(str(root), "val", str(tmp_path / "strict2"), ["64x48"], detections=str(dets),
                              workers=1, strict=True, progress=False)


def test_null_unlabelled_joints_are_kept_and_a_box_in_wrong_units_is_a_bad_box(coco_mini: Path,
                                                                              tmp_path: Path) -> None:
    """``null``/NaN coordinates of a v=0 joint keep the person; a box 1000x the image is skipped, not cropped.

    The box once made the crop box-average a block of ~k^2 pixels (k = box / crop side): gigabytes at 1e6 px.
    """
    from cal_core import evaluate

    root, anns, gt = _odd_root(coco_mini, tmp_path)
    unlabelled = next(a for a in anns if 0 in a["keypoints"][2::3])
    joint = unlabelled["keypoints"][2::3].index(0)
    unlabelled["keypoints"][3 * joint:3 * joint + 2] = [None, float("nan")]
    huge = next(a for a in anns if a is not unlabelled)
    huge["bbox"] = [5.0, 5.0, 1000 * 640.0, 1000 * 640.0]
    _write_json(root / "annotations" / "person_keypoints_val2017.json", gt)
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), ["64x48"], workers=1, progress=False)
    assert {(s["ann_id"], s["reason"]) for s in _manifest(out / "64x48")["skipped"]} == {(huge["id"], "bad_box")}
    assert unlabelled["id"] in {r["ann_id"] for r in _rows(out / "64x48")}
    written = json.loads((out / "64x48" / "annotations.json").read_text())
    record = next(a for a in written["annotations"] if a["id"] == unlabelled["id"])
    assert record["keypoints"][3 * joint:3 * joint + 3] == [0, 0, 0]
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in written["annotations"] if a["num_keypoints"]]
    assert evaluate.coco_keypoint_ap(out / "64x48" / "annotations.json", results)["AP"] == pytest.approx(1.0)


def test_a_split_that_keeps_nobody_is_an_error_naming_the_reasons(coco_mini: Path, tmp_path: Path) -> None:
    """String ids (or missing images) leave no person: a clear error, not an empty set that trains nothing."""
    root, anns, gt = _odd_root(coco_mini, tmp_path)
    for img in gt["images"]:
        img["id"] = str(img["id"])
    _write_json(root / "annotations" / "person_keypoints_val2017.json", gt)
    with pytest.raises(downsample.DownsampleError, match=r"no person instance kept: skipped \{'bad_image_record'.*"
                                                         rf"\(first: images\[0\]: bad_image_record \(id '{gt['images'][0]['id']}' is not a "
                                                         r"64-bit integer\)"):
        downsample.downsample(str(root), "val", str(tmp_path / "ids"), ["64x48"], workers=1, progress=False)
    root, anns, gt = _odd_root(coco_mini, tmp_path / "missing")
    for image in (root / "val2017").iterdir():
        image.unlink()
    with pytest.raises(downsample.DownsampleError, match=r"val2017: no person instance kept: skipped \{'missing_file'"):
        downsample.downsample(str(root), "val", str(tmp_path / "out"), ["64x48"], workers=1, progress=False)
    assert not (tmp_path / "out" / "64x48" / "manifest.json").exists()


def test_the_person_category_is_found_by_name_not_assumed_to_be_id_1(coco_mini: Path, tmp_path: Path) -> None:
    """A labelling tool's file: person is id 3, id 1 is "car" with its own boxes. People are cropped, cars not."""
    from cal_core import evaluate

    root = _small_root(coco_mini, tmp_path, n_images=4)
    path = root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(path.read_text())
    people = list(gt["annotations"])
    person = dict(gt["categories"][0], id=3)
    cars = [{"id": 9000 + i, "image_id": a["image_id"], "category_id": 1, "bbox": [1, 1, 30, 20], "area": 600,
             "iscrowd": 0} for i, a in enumerate(people)]
    for ann in people:
        ann["category_id"] = 3
    _write_json(path, {**gt, "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bicycle"}, person],
                       "annotations": people + cars})
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), ["64x48"], workers=1, progress=False)
    assert sorted(r["ann_id"] for r in _rows(out / "64x48")) == sorted(a["id"] for a in people if not a["iscrowd"])
    written = json.loads((out / "64x48" / "annotations.json").read_text())
    assert [c["id"] for c in written["categories"]] == [1] and written["categories"][0]["name"] == "person"
    assert {a["category_id"] for a in written["annotations"]} == {1} and len(written["annotations"]) == len(people)
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in written["annotations"] if a["num_keypoints"]]
    assert evaluate.coco_keypoint_ap(out / "64x48" / "annotations.json", results)["AP"] == pytest.approx(1.0)
    dets = tmp_path / "dets.json"  # a COCO detector's results: person is its category 1, the file's car
    _write_json(dets, [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in people])
    with pytest.raises(downsample.DownsampleError, match=r"no person instance kept.*'other_category': "):
        downsample.downsample(str(root), "val", str(tmp_path / "dets"), ["64x48"], detections=str(dets), workers=1,
                              progress=False)
    _write_json(path, {**gt, "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bicycle"}]})
    with pytest.raises(coco.AnnotationFileError, match="cannot tell which category is the person.*1: 'car'"):
        downsample.downsample(str(root), "val", str(tmp_path / "none"), ["64x48"], workers=1, progress=False)


def test_joints_listed_in_another_order_are_put_in_coco_order(coco_mini: Path, tmp_path: Path) -> None:
    """A tool's file names COCO's 17 joints in its own order (and spelling): shards and GT come out in COCO order."""
    from cal_core.skeleton import KEYPOINT_NAMES

    root = _small_root(coco_mini, tmp_path, n_images=4)
    path = root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(path.read_text())
    out = tmp_path / "coco-order"
    downsample.downsample(str(root), "val", str(out), ["64x48"], workers=1, progress=False)
    order = np.random.default_rng(0).permutation(17)  # the file's joint j is COCO joint order[j]
    names = [KEYPOINT_NAMES[k].replace("_", " ").title() for k in order]  # "Left Eye"
    for ann in gt["annotations"]:
        triplets = np.asarray(ann["keypoints"]).reshape(17, 3)
        ann["keypoints"] = triplets[order].reshape(-1).tolist()
    _write_json(path, {**gt, "categories": [{**gt["categories"][0], "keypoints": names, "skeleton": []}]})
    shuffled = tmp_path / "shuffled"
    downsample.downsample(str(root), "val", str(shuffled), ["64x48"], workers=1, progress=False)
    assert _rows(shuffled / "64x48") == _rows(out / "64x48")
    expected, got = (json.loads((o / "64x48" / "annotations.json").read_text()) for o in (out, shuffled))
    assert [a["keypoints"] for a in got["annotations"]] == [a["keypoints"] for a in expected["annotations"]]
    assert got["categories"][0]["keypoints"] == list(KEYPOINT_NAMES)
    for bad, why in ((names[:15], "15 keypoint names"), ([*names[:16], "tail"], r"not COCO names: \['tail'\]")):
        _write_json(path, {**gt, "categories": [{**gt["categories"][0], "keypoints": bad}]})
        with pytest.raises(coco.AnnotationFileError, match=why):
            downsample.downsample(str(root), "val", str(tmp_path / "bad"), ["64x48"], workers=1, progress=False)


def test_sizes_training_refuses_and_a_threshold_without_detections_are_warned_about(
        coco_mini: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _small_root(coco_mini, tmp_path, n_images=1)
    with caplog.at_level("WARNING", logger="cal_core.data.downsample"):
        downsample.downsample(str(root), "val", str(tmp_path / "out"), ["63x47", "64x48"], det_score_thr=0.5,
                              workers=1, progress=False)
    assert "input size 63x47: the pose models need sides that are multiples of 4" in caplog.text
    assert "64x48" not in caplog.text.split("multiples of 4")[0]
    assert "--det-score-thr 0.5 does nothing without --detections" in caplog.text


def test_an_area_of_zero_becomes_the_box_area_and_is_counted(coco_mini: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Converters without segmentation write area 0, which makes every person unmatchable in COCOeval (AP 0).

    The box area stands in, but it makes OKS more lenient than COCO's: the
    manifest counts those people and the run says so.
    """
    root = _small_root(coco_mini, tmp_path, n_images=3)
    path = root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(path.read_text())
    for ann in gt["annotations"][1:]:
        ann["area"] = 0
    _write_json(path, gt)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="cal_core.data.downsample"):
        downsample.downsample(str(root), "val", str(out), ["64x48"], workers=1, progress=False)
    boxes = {a["id"]: a["bbox"][2] * a["bbox"][3] for a in gt["annotations"][1:]}
    written = json.loads((out / "64x48" / "annotations.json").read_text())["annotations"]
    assert written and all(a["area"] == pytest.approx(boxes[a["id"]]) for a in written if a["id"] in boxes)
    assert all(r["area"] == pytest.approx(boxes[r["ann_id"]]) for r in _rows(out / "64x48") if r["ann_id"] in boxes)
    kept_zero = sum(1 for r in _rows(out / "64x48") if r["ann_id"] in boxes)
    assert kept_zero > 0
    assert shards.read_manifest(str(out / "64x48"))["counts"]["area_from_box"] == kept_zero
    assert f"{kept_zero} kept people have no positive area" in caplog.text
    downsample.downsample(str(coco_mini), "val", str(tmp_path / "coco"), ["64x48"], workers=1, progress=False)
    assert shards.read_manifest(str(tmp_path / "coco" / "64x48"))["counts"]["area_from_box"] == 0


def test_duplicates_escapes_and_absurd_values_are_skipped_with_a_reason(coco_mini: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    root, anns, gt = _odd_root(coco_mini, tmp_path)
    first_image = gt["images"][0]
    outside = tmp_path / "outside.jpg"
    shutil.copy(coco_mini / "val2017" / first_image["file_name"], outside)
    gt["images"] += [dict(first_image, file_name="other.jpg"),  # same id, another file
                     dict(first_image, id=777, file_name=str(outside))]  # absolute: outside the image folder
    second_image = gt["images"][1]
    gt["images"].insert(0, dict(second_image, width=0))  # malformed, before the good record of its id
    twin = dict(anns[0], bbox=[1, 1, 5, 5])  # same id, other record: the first one is kept
    huge = dict(anns[1], bbox=[5, 5, 1e300, 1.0], id=10**12)  # finite, but no invertible crop affine
    big_id = dict(anns[1], id=2**64)
    gt["annotations"] += [twin, huge, big_id, dict(anns[1], id=10**12 + 1, image_id=777)]
    _write_json(root / "annotations" / "person_keypoints_val2017.json", gt)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="cal_core.data.downsample"):
        report = downsample.downsample(str(root), "val", str(out), ["64x48"], workers=1, progress=False)
    assert "person_keypoints_val2017.json: 7 records skipped {'bad_box': 1, 'bad_image_record': 2, 'bad_record': 1, " \
        "'duplicate_id': 2, 'unknown_image': 1} (COCO ids are unique in the whole file: numbered per image?)" \
        in caplog.text
    reasons = {(s["image_id"], s["ann_id"], s["reason"]) for s in _manifest(out / "64x48")["skipped"]}
    assert reasons == {(first_image["id"], -1, "duplicate_id"), (777, -1, "bad_image_record"),
                       (second_image["id"], -1, "bad_image_record"),
                       (anns[0]["image_id"], anns[0]["id"], "duplicate_id"),
                       (anns[1]["image_id"], 10**12, "bad_box"), (anns[1]["image_id"], -1, "bad_record"),
                       (777, 10**12 + 1, "unknown_image")}
    where = {(s["ann_id"], s["reason"]): s["record"] for s in _manifest(out / "64x48")["skipped"]}
    assert where[-1, "bad_record"] == f"annotations[{gt['annotations'].index(big_id)}]"  # its id is unreadable
    detail = {(s["ann_id"], s["reason"], s["image_id"]): s.get("detail") for s in _manifest(out / "64x48")["skipped"]}
    assert detail[-1, "bad_record", anns[1]["image_id"]].endswith("is not a 64-bit integer")  # 2**64
    assert detail[-1, "bad_image_record", 777] == f"file_name {str(outside)!r} leaves the image folder"
    assert detail[-1, "bad_image_record", second_image["id"]] == f"size 0x{second_image['height']} is not positive"
    assert where[10**12, "bad_box"] == f"annotations[{gt['annotations'].index(huge)}]"
    assert where[-1, "duplicate_id"] == f"images[{gt['images'].index(dict(first_image, file_name='other.jpg'))}]"
    assert report["64x48"]["counts"]["instances"] == len(anns)
    rows = _rows(out / "64x48")
    assert sorted(r["ann_id"] for r in rows) == sorted(a["id"] for a in anns)
    first_row = next(r for r in rows if r["ann_id"] == anns[0]["id"])
    assert first_row["bbox"] == pytest.approx(anns[0]["bbox"])
    written = json.loads((out / "64x48" / "annotations.json").read_text())
    assert sorted(a["id"] for a in written["annotations"]) == sorted(a["id"] for a in anns)
    gt["images"] = [i for i in gt["images"] if i["width"] and i["id"] != 777 and i["file_name"] != "other.jpg"]
    gt["annotations"] = anns + [big_id]  # left broken: only the record without a usable id
    _write_json(root / "annotations" / "person_keypoints_val2017.json", gt)
    with pytest.raises(downsample.DownsampleError, match=rf"annotations\[{len(anns)}\]: image \d+ \(no file\), "
                                                         r"annotation -1: bad_record"):
        downsample.downsample(str(root), "val", str(tmp_path / "strict"), ["64x48"], workers=1, strict=True,
                              progress=False)
    assert next(a for a in written["annotations"] if a["id"] == anns[0]["id"])["bbox"] == pytest.approx(
        anns[0]["bbox"])
    assert [i["file_name"] for i in written["images"] if i["id"] == first_image["id"]] == [first_image["file_name"]]
    assert [i["width"] for i in written["images"] if i["id"] == second_image["id"]] == [second_image["width"]]


def test_rerun_writes_nothing(coco_mini: Path, tmp_path: Path) -> None:
    root = _small_root(coco_mini, tmp_path)
    out = tmp_path / "out"
    first = downsample.downsample(str(root), "val", str(out), SIZES, shard_size=5, workers=1, progress=False)
    assert first["64x48"]["written"] == first["64x48"]["shards"] >= 3
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = downsample.downsample(str(root), "val", str(out), SIZES, shard_size=5, workers=1, progress=False)
    assert all(r["already_complete"] and r["written"] == 0 for r in again.values())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_second_run_into_a_busy_out_is_refused(coco_mini: Path, tmp_path: Path) -> None:
    """Two runs into one out interleaved their shards and journals."""
    root = _small_root(coco_mini, tmp_path)
    with storage.exclusive(tmp_path / "out", "downsampling"), \
            pytest.raises(storage.FolderInUseError, match="out is in use by another running downsampling"):
        downsample.downsample(str(root), "val", str(tmp_path / "out"), SIZES, workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_rerun_with_the_root_spelled_otherwise_writes_nothing(coco_mini: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = _small_root(coco_mini, tmp_path)
    (tmp_path / "link").symlink_to(root)
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), SIZES, shard_size=5, workers=1, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    monkeypatch.chdir(root.parent)
    for spelling in (root.name, f"./{root.name}/", f"file://{root}", f"../{tmp_path.name}/link"):
        again = downsample.downsample(spelling, "val", str(out), SIZES, shard_size=5, workers=1, progress=False)
        assert all(r["already_complete"] for r in again.values()), spelling
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_rerun_after_fixing_the_images_the_manifest_named_recovers_their_people(coco_mini: Path,
                                                                               tmp_path: Path) -> None:
    """Skipped as missing/corrupt, then restored: the same command recomputes (it once kept the old set)."""
    root, expected = _broken_root(coco_mini, tmp_path)
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), ["64x48"], shard_size=4, workers=1, progress=False)
    broken = {s["file"] for s in _manifest(out / "64x48")["skipped"] if s["reason"] in downsample.IMAGE_REASONS}
    assert len(broken) == 2
    again = downsample.downsample(str(root), "val", str(out), ["64x48"], shard_size=4, workers=1, progress=False)
    assert again["64x48"]["already_complete"]  # nothing changed: nothing recomputed
    for name in broken:
        shutil.copy(coco_mini / "val2017" / name, root / "val2017" / name)
    fixed = downsample.downsample(str(root), "val", str(out), ["64x48"], shard_size=4, workers=1, progress=False)
    fresh = downsample.downsample(str(root), "val", str(tmp_path / "fresh"), ["64x48"], shard_size=4, workers=1,
                                  progress=False)
    assert not fixed["64x48"]["already_complete"]
    assert fixed["64x48"]["counts"] == fresh["64x48"]["counts"]
    assert not {s["file"] for s in _manifest(out / "64x48")["skipped"]} & broken
    assert _manifest(out / "64x48")["shards"] == _manifest(tmp_path / "fresh" / "64x48")["shards"]


@pytest.mark.parametrize("kill_at, damage", [(3, False), (6, False), (4, True)])
def test_killed_run_resumes_to_the_same_result(coco_mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               kill_at: int, damage: bool) -> None:
    """Killed at the ``kill_at``-th shard write (sizes alternate: 64x48, 256x192, 64x48, ...), then rerun."""
    root = _small_root(coco_mini, tmp_path)
    reference = tmp_path / "reference"
    downsample.downsample(str(root), "val", str(reference), SIZES, shard_size=4, workers=1, progress=False)
    real_flush = downsample.Output.flush
    calls = {"n": 0}

    def dying_flush(self: downsample.Output, start: list[Any]) -> None:
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt("killed")
        real_flush(self, start)

    monkeypatch.setattr(downsample.Output, "flush", dying_flush)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        downsample.downsample(str(root), "val", str(out), SIZES, shard_size=4, workers=1, progress=False)
    assert not (out / "64x48" / "manifest.json").exists() and (out / "64x48" / shards.PROGRESS).exists()
    monkeypatch.setattr(downsample.Output, "flush", real_flush)
    if damage:
        (out / "256x192" / "shard-00000.parquet").write_bytes(b"damaged")  # must be detected and redone
    report = downsample.downsample(str(root), "val", str(out), SIZES, shard_size=4, workers=1, progress=False)
    total = report["64x48"]["shards"]
    done_small, done_large = kill_at // 2, (kill_at - 1) // 2  # shards written before the kill
    if damage:
        done_large = 0
    assert report["64x48"]["written"] == total - done_small
    assert report["256x192"]["written"] == total - done_large
    assert _files(out) == _files(reference)


def test_parallel_workers_give_identical_bytes(coco_mini: Path, tmp_path: Path) -> None:
    root = _small_root(coco_mini, tmp_path, n_images=8)
    one, two = tmp_path / "one", tmp_path / "two"
    downsample.downsample(str(root), "val", str(one), ["64x48"], shard_size=6, workers=1, progress=False)
    downsample.downsample(str(root), "val", str(two), ["64x48"], shard_size=6, workers=2, progress=False)
    assert _files(one) == _files(two)


@pytest.mark.timeout(120)
def test_a_killed_worker_is_an_error_not_a_hang_and_a_rerun_completes(coco_mini: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed mid-run (the OOM killer, a decoder crash) must not leave the run waiting forever."""
    root = _small_root(coco_mini, tmp_path, n_images=8)
    gt = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())
    victim = (root / "val2017" / sorted(i["file_name"] for i in gt["images"])[4]).read_bytes()
    real_decode = crops.decode

    def dying_decode(data: bytes, min_step: float, max_pixels: int) -> crops.Decoded:
        if data == victim:
            os._exit(137)  # in the forked worker: as SIGKILL would, without cleanup
        return real_decode(data, min_step, max_pixels)

    out, reference = tmp_path / "out", tmp_path / "reference"
    with monkeypatch.context() as patch:
        patch.setattr(crops, "decode", dying_decode)
        with pytest.raises(downsample.WorkerCrashError, match=r"worker process died .* rerun the same command"):
            downsample.downsample(str(root), "val", str(out), ["64x48"], shard_size=2, workers=2, progress=False)
    assert not (out / "64x48" / "manifest.json").exists()
    downsample.downsample(str(root), "val", str(out), ["64x48"], shard_size=2, workers=2, progress=False)
    downsample.downsample(str(root), "val", str(reference), ["64x48"], shard_size=2, workers=1, progress=False)
    assert _files(out) == _files(reference)


def test_a_pool_broken_while_refilling_is_a_worker_crash_error(coco_mini: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker death seen by ``submit`` (not by ``result``) is the same clear error, not a BrokenProcessPool."""
    root = _small_root(coco_mini, tmp_path, n_images=24)
    window = downsample.IN_FLIGHT_PER_WORKER * 2

    class Breaking(downsample.ProcessPoolExecutor):
        calls = 0

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            Breaking.calls += 1
            if Breaking.calls > window:  # the first refill, after the initial window went in
                raise BrokenProcessPool("A child process terminated abruptly")
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(downsample, "ProcessPoolExecutor", Breaking)
    with pytest.raises(downsample.WorkerCrashError, match=r"died .* with \S+ \(image \d+\) or a later image"):
        downsample.downsample(str(root), "val", str(tmp_path / "out"), ["64x48"], workers=2, progress=False)
    assert Breaking.calls == window + 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_stage(coco_mini: Path, tmp_path: Path) -> None:
    """SIGKILL of the stage (no cleanup possible) must not leave its pool workers running as orphans."""
    root, pids = _small_root(coco_mini, tmp_path, n_images=12), tmp_path / "pids"
    pids.mkdir()
    script = f"""
import os, time
from cal_core.data import crops, downsample
real = crops.decode
def slow_decode(data, min_step, max_pixels):
    open(os.path.join({str(pids)!r}, str(os.getpid())), "w").close()
    time.sleep(0.5)
    return real(data, min_step, max_pixels)
crops.decode = slow_decode
downsample.downsample({str(root)!r}, "val", {str(tmp_path / "out")!r}, ["64x48"], workers=2, progress=False)
"""
    stage = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline and stage.poll() is None:
        time.sleep(0.1)
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == 2 and stage.poll() is None, "the workers never started"
    stage.kill()
    stage.wait()
    time.sleep(2)
    alive = [pid for pid in workers if _running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed stage"


def _running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an orphan's reaper may be slow to collect it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_detections_as_box_source(coco_mini: Path, tmp_path: Path) -> None:
    root = _small_root(coco_mini, tmp_path, n_images=6)
    gt = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())
    people = [a for a in gt["annotations"] if not a["iscrowd"]]
    dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.1 + 0.8 * (i % 2)}
            for i, a in enumerate(people)]
    dets.append({"image_id": people[0]["image_id"], "category_id": 1, "bbox": [1, 1, -5, 10], "score": 0.99})
    det_file = tmp_path / "dets.json"
    _write_json(det_file, dets)
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), ["64x48"], detections=str(det_file), det_score_thr=0.5,
                          workers=1, progress=False)
    rows = _rows(out / "64x48")
    kept = [d for d in dets[:-1] if d["score"] >= 0.5]
    assert len(rows) == len(kept) and all(r["ann_id"] == -1 and r["num_keypoints"] == 0 for r in rows)
    assert sorted(r["score"] for r in rows) == pytest.approx(sorted(d["score"] for d in kept))
    manifest = _manifest(out / "64x48")
    assert manifest["counts"]["skipped"] == {"bad_box": 1}
    assert manifest["counts"]["excluded"] == {"below_score_threshold": len(dets) - 1 - len(kept)}
    subset = json.loads((out / "64x48" / "annotations.json").read_text())
    assert {i["id"] for i in subset["images"]} == {a["image_id"] for a in people}  # missed people still count


def test_missed_people_count_when_the_gt_writes_ids_as_floats(coco_mini: Path, tmp_path: Path) -> None:
    """Images with GT people but no detection reach annotations.json even with ids written as ``5.0``."""
    root = _small_root(coco_mini, tmp_path, n_images=4)
    path = root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(path.read_text())
    for ann in gt["annotations"]:
        ann["image_id"], ann["category_id"] = float(ann["image_id"]), float(ann["category_id"])
    _write_json(path, gt)
    people = sorted({int(a["image_id"]) for a in gt["annotations"] if not a["iscrowd"]})
    detected = [a for a in gt["annotations"] if int(a["image_id"]) == people[0] and not a["iscrowd"]]
    det_file = tmp_path / "dets.json"
    _write_json(det_file, [{"image_id": people[0], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
                           for a in detected])
    out = tmp_path / "out"
    downsample.downsample(str(root), "val", str(out), ["64x48"], detections=str(det_file), workers=1,
                          progress=False)
    subset = json.loads((out / "64x48" / "annotations.json").read_text())
    assert len(people) > 1 and [i["id"] for i in subset["images"]] == people
    assert {a["image_id"] for a in subset["annotations"]} == set(people)


def test_cli_runs_the_stage(coco_mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from cal_core.cli import main

    root = _small_root(coco_mini, tmp_path, n_images=3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # unreachable: offline tracking file
    argv = ["downsample", "--coco", str(root), "--split", "val", "--out", str(tmp_path / "out"),
            "--input-size", "64x48", "--input-size", "128x96", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("128x96:") and "all already complete" in line for line in lines)
    assert (tmp_path / "out" / "128x96" / "manifest.json").is_file()


def test_cli_reports_bad_data_in_one_line_with_exit_code_2(coco_mini: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from cal_core.cli import main

    root = _small_root(coco_mini, tmp_path, n_images=2)
    path = root / "annotations" / "person_keypoints_val2017.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # unreachable: offline tracking file
    argv = ["downsample", "--coco", str(root), "--split", "val", "--out", "out", "--input-size", "64x48",
            "--workers", "1", "--no-progress"]
    gt = json.loads(path.read_text())
    _write_json(path, {**gt, "images": [{**gt["images"][0], "id": "x"}, *gt["images"][1:]],
                       "annotations": [a for a in gt["annotations"] if a["image_id"] == gt["images"][0]["id"]]})
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "downsample: " in err
    assert "no person instance kept" in err and "(first: images[0]: bad_image_record (id 'x' is not a 64-bit integer); " \
        "annotations[" in err
    path.write_text("{not json")
    assert main([*argv, "--strict"]) == 2
    assert "person_keypoints_val2017.json" in capsys.readouterr().err


def test_another_layout_is_named_by_ann_file_and_image_dir(coco_mini: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from cal_core.cli import main

    root = _small_root(coco_mini, tmp_path, n_images=3)
    other = tmp_path / "ochuman-like"  # one JSON beside an images/ folder, the JSON outside the root
    (other / "images").mkdir(parents=True)
    for image in (root / "val2017").iterdir():
        (other / "images" / image.name).symlink_to(image.resolve())
    labels = tmp_path / "labels" / "people.json"
    labels.parent.mkdir()
    labels.write_bytes((root / "annotations" / "person_keypoints_val2017.json").read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # unreachable: offline tracking file
    base = ["downsample", "--split", "val", "--input-size", "64x48", "--workers", "1", "--no-progress"]
    assert main([*base, "--coco", str(root), "--out", "standard"]) == 0
    assert main([*base, "--coco", "ochuman-like", "--ann-file", str(labels), "--image-dir", "images",
                 "--out", "other"]) == 0
    source = _manifest(tmp_path / "other" / "64x48")["source"]
    assert source["annotations"]["uri"] == str(labels) and source["images"] == str(other / "images")
    assert _rows(tmp_path / "other" / "64x48") == _rows(tmp_path / "standard" / "64x48")
    with pytest.raises(coco.AnnotationFileError, match="person_keypoints_val2017.json"):
        downsample.downsample(str(other), "val", str(tmp_path / "x"), ["64x48"], workers=1, progress=False)


def test_layout_paths_are_relative_to_the_root_unless_absolute_or_uris() -> None:
    assert coco.annotation_uri("s3://b/coco", "val") == "s3://b/coco/annotations/person_keypoints_val2017.json"
    assert coco.annotation_uri("s3://b/coco", "train", "labels/train.json") == "s3://b/coco/labels/train.json"
    assert coco.annotation_uri("s3://b/coco", "val", "s3://other/val.json/") == "s3://other/val.json"
    assert coco.image_root("s3://b/coco", "val", "imgs/") == "s3://b/coco/imgs"
    assert coco.image_root("/data/coco", "train") == "/data/coco/train2017"
    assert coco.image_root("/data/coco", "val", "file:///srv/images") == "/srv/images"


def test_s3_round_trip(coco_mini: Path, tmp_path: Path, s3_server) -> None:  # noqa: F811
    root = _small_root(coco_mini, tmp_path, n_images=4)
    bucket = f"s3://{s3_server.bucket}"
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.upload(path, f"{bucket}/coco/{path.relative_to(root).as_posix()}")
    local = tmp_path / "local"
    downsample.downsample(str(root), "val", str(local), ["64x48"], shard_size=3, workers=1, progress=False)
    # local COCO -> S3 shards, read back through the shard readers
    report = downsample.downsample(str(root), "val", f"{bucket}/shards", ["64x48"], shard_size=3, workers=1,
                                   progress=False)
    remote = f"{bucket}/shards/64x48"
    manifest = shards.read_manifest(remote)
    assert manifest["shards"] == _manifest(local / "64x48")["shards"]
    tables = [shards.read_shard(uri, entry) for uri, entry in zip(shards.shard_uris(remote), manifest["shards"],
                                                                  strict=True)]
    assert [row for t in tables for row in t.to_pylist()] == _rows(local / "64x48")
    names = [uri.rsplit("/", 1)[-1] for uri in storage.list_prefix(remote)]
    assert names == sorted(["annotations.json", "manifest.json", *(e["path"] for e in manifest["shards"])])
    again = downsample.downsample(str(root), "val", f"{bucket}/shards", ["64x48"], shard_size=3, workers=1,
                                  progress=False)
    assert again["64x48"]["already_complete"] and again["64x48"]["written"] == 0
    assert report["64x48"]["written"] == len(manifest["shards"])
    # COCO read from S3 by worker processes -> the same shard bytes
    from_s3 = tmp_path / "from_s3"
    downsample.downsample(f"{bucket}/coco", "val", str(from_s3), ["64x48"], shard_size=3, workers=2,
                          progress=False)
    assert {k: v for k, v in _files(from_s3).items() if k != "64x48/manifest.json"} == \
        {k: v for k, v in _files(local).items() if k != "64x48/manifest.json"}
    assert _manifest(from_s3 / "64x48")["source"]["annotations"]["uri"].startswith(bucket)


def test_shard_readers_reject_corrupt_or_mismatched_shards(full: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "set"
    shutil.copytree(full["val"] / "64x48", folder)
    entry = shards.read_manifest(str(folder))["shards"][0]
    uri = str(folder / entry["path"])
    assert len(shards.read_shard(uri, entry)) == entry["rows"]
    assert shards.shard_is_complete(str(folder), entry)
    with pytest.raises(shards.ShardError, match="rows, the manifest says"):
        shards.read_shard(uri, {**entry, "rows": entry["rows"] + 1, "sha256": entry["sha256"]})
    assert not shards.shard_is_complete(str(folder), {**entry, "rows": entry["rows"] + 1})
    Path(uri).write_bytes(Path(uri).read_bytes()[:-10])
    with pytest.raises(shards.ShardError, match=rf"{entry['path']}: sha256 differs"):
        shards.read_shard(uri, entry)
    with pytest.raises(shards.ShardError, match="not a readable parquet shard"):
        shards.read_shard(uri)
    assert not shards.shard_is_complete(str(folder), entry)
    assert not shards.shard_is_complete(str(folder), {"rows": 1})
    (folder / "manifest.json").write_text("{")
    with pytest.raises(shards.ShardError, match="manifest.json: not valid JSON"):
        shards.read_manifest(str(folder))
    with pytest.raises(shards.ShardError, match="cannot read"):
        shards.read_manifest(str(tmp_path / "nowhere"))


def test_a_string_is_no_box() -> None:
    assert coco.parse_box("1234") is None and coco.parse_box(b"1234") is None
    assert coco.parse_box(["1", 2, 3, 4]) == (1.0, 2.0, 3.0, 4.0)


def test_nan_score_threshold_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(downsample.DownsampleError, match="det_score_thr is NaN"):
        downsample.downsample(str(tmp_path), "val", str(tmp_path / "out"), ["64x48"], det_score_thr=float("nan"))
    with pytest.raises(downsample.DownsampleError, match="max_image_pixels must be >= 0"):
        downsample.downsample(str(tmp_path), "val", str(tmp_path / "out"), ["64x48"], max_image_pixels=-1)


def test_the_pixel_guard_skips_too_large_images_and_can_be_raised(coco_mini: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Images over PIL's ~179 MP were skipped as corrupt_image with no way round it (gigapixel frames)."""
    data = sorted((coco_mini / "val2017").glob("*.jpg"))[0].read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (30, 20)).save(png, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own guard must not decide instead of ours
    for image in (data, png.getvalue()):  # the JPEG and the PIL paths
        with pytest.raises(crops.ImageTooLargeError, match=r"pixels is over the decompression-bomb guard of 500"):
            crops.decode(image, 1.0, max_pixels=500)
        assert crops.decode(image, 1.0, max_pixels=0).pixels.size
    assert Image.MAX_IMAGE_PIXELS == 100  # lifted only while reading the header
    monkeypatch.undo()
    root = _small_root(coco_mini, tmp_path, n_images=2)
    with pytest.raises(downsample.DownsampleError, match=r"no person instance kept: skipped \{'too_large'"):
        downsample.downsample(str(root), "val", str(tmp_path / "small"), ["64x48"], workers=1, progress=False,
                              max_image_pixels=1000)
    report = downsample.downsample(str(root), "val", str(tmp_path / "any"), ["64x48"], workers=1, progress=False,
                                   max_image_pixels=0)
    assert report["64x48"]["counts"]["instances"] > 0
    assert _manifest(tmp_path / "any" / "64x48")["settings"]["max_image_pixels"] == 0  # a rerun with another recomputes


@pytest.mark.parametrize("margin", [0.5, float("nan"), float("inf")])
def test_bad_margin_is_a_clear_error(tmp_path: Path, margin: float) -> None:
    with pytest.raises(downsample.DownsampleError, match="margin >= 1"):
        downsample.downsample(str(tmp_path / "coco"), "val", str(tmp_path / "out"), ["64x48"], margin=margin,
                              workers=1, progress=False)
