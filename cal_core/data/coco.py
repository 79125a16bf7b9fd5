"""Reading and validating COCO person-keypoint annotations for the downsampling stage.

A COCO root (local folder or ``s3://`` prefix) holds
``annotations/person_keypoints_<split>2017.json`` and the images in
``<split>2017/`` (other layouts name the file and folder:
:func:`annotation_uri`, :func:`image_root`). :func:`plan_split` turns the JSON into per-image work
(:class:`ImageTask`) following COCO practice:

- train keeps non-crowd people with at least one labelled keypoint;
- val keeps every non-crowd person (pycocotools must see them all), or, with
  a detection results file, every person detection scoring at least the
  threshold (``ann_id`` -1, ``score`` the detector's).

Crowd regions, unlabelled train people and low-scoring detections are
*excluded* by these rules (counted). Malformed records are *skipped* and
listed with a reason (:class:`Skip`), so one bad annotation never stops or
silently corrupts a run. An annotation file that cannot be read or is not
COCO is an error naming the file and why.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from cal_core import storage
from cal_core.skeleton import COCO_PERSON_CATEGORY, KEYPOINT_NAMES, NUM_KEYPOINTS

SPLITS = ("train", "val")
#: COCO's category id of "person": what annotations.json (and so evaluation) uses, whatever the source's id.
PERSON = int(COCO_PERSON_CATEGORY["id"])

# Skip reasons (records that are malformed or unusable; listed in the manifest).
BAD_RECORD = "bad_record"
BAD_IMAGE_RECORD = "bad_image_record"
UNKNOWN_IMAGE = "unknown_image"
BAD_BOX = "bad_box"
BAD_KEYPOINTS = "bad_keypoints"
OUTSIDE_IMAGE = "outside_image"
MISSING_FILE = "missing_file"
CORRUPT_IMAGE = "corrupt_image"
TOO_LARGE = "too_large"
SIZE_MISMATCH = "size_mismatch"
DUPLICATE_ID = "duplicate_id"
#: Person box sides (px) outside this range are broken records (their crop affine would not be invertible).
BOX_SIDE_RANGE = (1e-3, 1e7)
#: A box side over this many times the image's longer side is a broken record (wrong units, say): cropping
#: it would box-average blocks of up to (side / crop side)^2 pixels, gigabytes for a 1e6 px box.
MAX_BOX_TO_IMAGE = 100.0


class AnnotationFileError(ValueError):
    """An annotation or detection file that cannot be read or is not in COCO format."""


@dataclass(frozen=True)
class Instance:
    """One person to crop: a GT annotation (or a detection, ``ann_id`` -1)."""

    ann_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in image pixels
    keypoints: np.ndarray  # (17, 3) float64 x, y, v; unlabelled joints are 0, 0, 0
    score: float
    area: float

    @functools.cached_property
    def num_keypoints(self) -> int:
        """Labelled joints (v > 0), counted from the keypoints rather than trusted from the file."""
        return int((self.keypoints[:, 2] > 0).sum())


@dataclass(frozen=True)
class ImageTask:
    """One image to decode and the people to crop from it, in row order."""

    image_id: int
    file_name: str
    width: int
    height: int
    instances: tuple[Instance, ...]


@dataclass(frozen=True)
class Skip:
    """A record left out because it is malformed or unusable, and why.

    ``record`` says where it is in its JSON file (``annotations[12]``,
    ``images[3]``, ``[7]`` in a detections list), so a record whose ids are
    unreadable (-1 here) can still be found; empty for skipped image files.
    """

    image_id: int
    ann_id: int
    file: str
    reason: str
    record: str = ""
    detail: str = ""  # what is wrong with a malformed record, e.g. "image_id '397133' is not a 64-bit integer"

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry of this skip (``record`` and ``detail`` only when known)."""
        entry = {"image_id": self.image_id, "ann_id": self.ann_id, "file": self.file, "reason": self.reason}
        extra = {"record": self.record, "detail": self.detail}
        return {**entry, **{key: value for key, value in extra.items() if value}}


@dataclass
class SplitPlan:
    """The work for one split: image tasks (sorted by image id), skips and rule exclusions.

    ``gt_images``: the images with a kept ground-truth person, whatever the
    box source (with detections, those without one still go to pycocotools).
    ``detection_skips``: how many of the last ``skipped`` entries are
    detection records (the others are records of the annotation file).
    ``area_from_box``: kept GT people whose file gives no positive ``area``
    (:func:`_area` uses the box's).
    """

    tasks: list[ImageTask]
    skipped: list[Skip] = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)
    gt_images: set[int] = field(default_factory=set)
    detection_skips: int = 0
    area_from_box: int = 0


def annotation_uri(coco_root: str, split: str, ann_file: str | None = None) -> str:
    """The split's annotation file: ``ann_file`` under the root, else ``annotations/person_keypoints_<split>2017.json``.

    ``ann_file`` is relative to ``coco_root`` unless it is an absolute path
    or a URI (another layout than COCO 2017's: OCHuman, COCO 2014, your own).
    """
    _check_split(split)
    return _under(coco_root, ann_file or f"annotations/person_keypoints_{split}2017.json")


def image_root(coco_root: str, split: str, image_dir: str | None = None) -> str:
    """The folder the split's ``file_name`` s are relative to: ``image_dir`` under the root, else ``<split>2017``."""
    _check_split(split)
    return _under(coco_root, image_dir or f"{split}2017")


def _under(root: str, path: str) -> str:
    """``path`` (canonical) if it is absolute or a URI (``s3://``, ``file://``), else ``path`` inside ``root``."""
    if storage.is_s3(path) or path.startswith(("/", "file://")):
        return storage.canonical(path)
    return storage.join(root, *path.strip("/").split("/"))


def _check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is ``train`` or ``val``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def read_json(uri: str) -> tuple[Any, bytes]:
    """Parsed JSON of ``uri`` and its raw bytes; :class:`AnnotationFileError` naming the file on failure."""
    try:
        raw = storage.read_bytes(uri)
    except (OSError, storage.StorageError) as exc:
        raise AnnotationFileError(f"{uri}: cannot read the file ({exc})") from exc
    try:
        return orjson.loads(raw), raw  # ~5x faster than json on COCO files (full train: ~240 MB)
    except orjson.JSONDecodeError:
        pass  # NaN/Infinity literals, huge ints, bad bytes: the stdlib parser accepts them or says where
    try:
        return json.loads(raw), raw
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationFileError(f"{uri}: not valid JSON ({exc})") from exc


def check_coco(data: Any, uri: str) -> dict[str, Any]:
    """``data`` if it is a COCO keypoints file (images, annotations, a person category), else an error."""
    if not isinstance(data, dict):
        raise AnnotationFileError(
            f"{uri}: not a COCO annotation file (top level is {type(data).__name__}, expected an object)"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationFileError(f"{uri}: not a COCO annotation file (no {key!r} list)")
    keypoint_order(data, uri)
    return data


def person_category(coco: dict[str, Any], uri: str = "the annotation file") -> dict[str, Any]:
    """The person category record: the one named "person", else the one with 17 keypoint names.

    COCO gives person id 1, but labelling tools number categories in their
    own order, so the id is looked up, never assumed (assuming 1 once made
    a file whose id 1 is "bicycle" yield an empty set, and one whose id 1
    is "car" crop cars as people). A file with a single category uses it.
    An ambiguous or missing person category is an error naming the file.
    """
    cats = [c for c in coco["categories"] if isinstance(c, dict) and _int_id(c.get("id")) is not None]
    named = [c for c in cats if str(c.get("name", "")).strip().lower() == "person"]
    keypointed = [c for c in cats if isinstance(c.get("keypoints"), list) and len(c["keypoints"]) == NUM_KEYPOINTS]
    for found in (named, keypointed, cats if len(cats) == 1 else []):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            break
    every = [c for c in coco["categories"] if isinstance(c, dict)]
    listed = ", ".join(f"{c.get('id')!r}: {c.get('name')!r}" for c in every[:20]) or "none"
    raise AnnotationFileError(f"{uri}: cannot tell which category is the person (one with an integer id, named "
                              f"'person' or with {NUM_KEYPOINTS} keypoint names): categories {listed}")


def keypoint_order(coco: dict[str, Any], uri: str = "the annotation file") -> np.ndarray | None:
    """Indices that put the file's joints in COCO order, or None when they already are.

    Every annotation's ``keypoints`` triplets follow the person category's
    ``keypoints`` names, and labelling tools may list COCO's 17 joints in
    another order; taking them as COCO's would train wrong joints (and flip
    the wrong pairs) without any error. Names compare ignoring case, spaces,
    ``-`` and ``_``. A category without names is taken to be in COCO order;
    names that are not COCO's 17 are an error naming the file.
    """
    names = person_category(coco, uri).get("keypoints")
    if not isinstance(names, list) or not names:
        return None
    coco_keys = [_name_key(n) for n in KEYPOINT_NAMES]
    file_keys = [_name_key(n) for n in names]
    if file_keys == coco_keys:
        return None
    if sorted(file_keys) != sorted(coco_keys):
        unknown = [n for n, k in zip(names, file_keys, strict=True) if k not in coco_keys][:5]
        raise AnnotationFileError(
            f"{uri}: the person category's {len(names)} keypoint names are not COCO's {NUM_KEYPOINTS} in any order"
            f"{f' (not COCO names: {unknown})' if unknown else ''}; cal-pose trains the COCO skeleton "
            f"({', '.join(KEYPOINT_NAMES)})")
    return np.array([file_keys.index(k) for k in coco_keys])


def _name_key(name: Any) -> str:
    """A keypoint name for comparison: lower case, letters and digits only (``Left Eye`` = ``left_eye``)."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def person_category_id(coco: dict[str, Any]) -> int:
    """The id the file gives the person category (:func:`person_category`)."""
    return int(_int_id(person_category(coco)["id"]))  # type: ignore[arg-type]


def check_detections(data: Any, uri: str) -> list[dict[str, Any]]:
    """``data`` if it is a COCO results list (objects with image_id, bbox, score), else an error."""
    if not isinstance(data, list):
        raise AnnotationFileError(
            f"{uri}: not a COCO detection results file (expected a list, got {type(data).__name__})"
        )
    for i, det in enumerate(data):
        if not isinstance(det, dict) or not {"image_id", "bbox", "score"} <= det.keys():
            raise AnnotationFileError(f"{uri}: entry {i} is not a detection (needs image_id, bbox, score)")
    return data


def _int_id(value: Any) -> int | None:
    """``value`` as a 64-bit id if it is an integer or an integral float (bools are not), else None.

    Shards store ids as int64; some exporters write ``640.0`` for integers.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        return None
    return int(value) if -(2**63) <= value < 2**63 else None


def _or_minus_one(value: int | None) -> int:
    """An id for a skip entry: the id, or -1 when the record has none."""
    return -1 if value is None else value


def _id_problem(record: Any, keys: tuple[str, ...]) -> str:
    """Why a record's ``keys`` are not all integer ids (e.g. ``"image_id '397133' is not a 64-bit integer"``), else ""."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key in keys:
        if key not in record:
            return f"no {key}"
        if _int_id(record[key]) is None:
            return f"{key} {record[key]!r} is not a 64-bit integer"[:200]
    return ""


def _image_record(img: Any) -> tuple[int, str, int, int] | str:
    """``(id, file_name, width, height)`` of a well-formed image record, else what is wrong with it."""
    problem = _id_problem(img, ("id", "width", "height"))
    if problem:
        return problem
    image_id, width, height = _int_id(img["id"]), _int_id(img["width"]), _int_id(img["height"])
    name = img.get("file_name")
    if not isinstance(name, str) or not name:
        return f"file_name {name!r} is not a file name"
    if width <= 0 or height <= 0:
        return f"size {width}x{height} is not positive"
    if ".." in name.split("/") or name.startswith("/") or "://" in name:
        return f"file_name {name!r} leaves the image folder"
    return image_id, name, width, height  # type: ignore[return-value]


def parse_box(box: Any) -> tuple[float, float, float, float] | None:
    """A finite ``(x, y, w, h)`` with sides in :data:`BOX_SIDE_RANGE`, else None (a string is no box)."""
    if isinstance(box, str | bytes):
        return None
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError, OverflowError):
        return None
    low, high = BOX_SIDE_RANGE
    if len(values) != 4 or not all(math.isfinite(v) for v in values) \
            or not (low <= values[2] <= high and low <= values[3] <= high):
        return None
    return values  # type: ignore[return-value]


def parse_keypoints(keypoints: Any, order: np.ndarray | None = None) -> np.ndarray | None:
    """COCO's flat ``[x, y, v] * 17`` as a ``(17, 3)`` array (v=0 joints zeroed), else None.

    Unlabelled joints (``v == 0``) may carry anything as coordinates (some
    exporters write ``null`` or NaN there); labelled ones must be finite.
    ``order`` (:func:`keypoint_order`) puts the file's joints in COCO order.
    """
    try:
        kp = np.asarray(keypoints, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if kp.shape != (NUM_KEYPOINTS * 3,):
        return None
    kp = kp.reshape(NUM_KEYPOINTS, 3)
    kp = kp[order] if order is not None else kp.copy()
    v = kp[:, 2]
    unlabelled = v == 0
    if not (unlabelled | (v == 1) | (v == 2)).all():
        return None
    kp[unlabelled] = 0.0
    return kp if np.isfinite(kp).all() else None


def outside_image(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    """True if the box does not overlap the image at all."""
    x, y, w, h = box
    return x >= width or y >= height or x + w <= 0 or y + h <= 0


def _box_problem(box: tuple[float, float, float, float] | None, size: tuple[int, int]) -> str | None:
    """The skip reason of a parsed box on an image of ``size`` (W, H), or None if it can be cropped."""
    if box is None or max(box[2], box[3]) > MAX_BOX_TO_IMAGE * max(size):
        return BAD_BOX
    return OUTSIDE_IMAGE if outside_image(box, *size) else None


def _gt_instance(ann: dict[str, Any], split: str, size: tuple[int, int],
                 order: np.ndarray | None) -> Instance | str | None:
    """The annotation as an :class:`Instance` (joints in COCO ``order``), a skip reason, or None when a rule excludes it."""
    box = parse_box(ann.get("bbox"))
    problem = _box_problem(box, size)
    if problem == BAD_BOX:
        return problem
    kp = parse_keypoints(ann.get("keypoints"), order)
    if kp is None or _far_keypoints(kp, size):
        return BAD_KEYPOINTS
    if problem:  # outside the image
        return problem
    instance = Instance(int(ann["id"]), box, kp, 1.0, _area(ann.get("area"), box))
    return None if split == "train" and instance.num_keypoints == 0 else instance


def _area(value: Any, box: tuple[float, float, float, float]) -> float:
    """The annotation's area if it is a positive finite number, else the box's.

    COCOeval divides by the area (OKS scale): an area of 0, which converters
    write when there is no segmentation, makes the person unmatchable and
    silently turns AP to 0. The box area is larger than a segmentation's
    (roughly 1.5-2x for people), so OKS is then more lenient than COCO's:
    :attr:`SplitPlan.area_from_box` counts these people.
    """
    return float(value) if _has_area(value) else box[2] * box[3]


def _has_area(value: Any) -> bool:
    """True if ``value`` is a usable annotation area: a positive finite number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _far_keypoints(kp: np.ndarray, size: tuple[int, int]) -> bool:
    """True if a labelled joint lies over :data:`MAX_BOX_TO_IMAGE` image sides away (wrong units, say).

    Such a coordinate (1e40 is finite in float64) would overflow the float32
    shard columns to inf and poison every training batch it lands in.
    """
    labelled = kp[:, 2] > 0
    return bool((np.abs(kp[labelled, :2]) > MAX_BOX_TO_IMAGE * max(size)).any())


def _det_instance(det: dict[str, Any], size: tuple[int, int]) -> Instance | str:
    """A detection as an :class:`Instance` (no keypoints, ``ann_id`` -1) or a skip reason."""
    box = parse_box(det.get("bbox"))
    problem = _box_problem(box, size)
    if problem:
        return problem
    return Instance(-1, box, np.zeros((NUM_KEYPOINTS, 3)), float(det["score"]), box[2] * box[3])


def _images(coco: dict[str, Any], plan: SplitPlan) -> dict[int, tuple[int, str, int, int]]:
    """Well-formed image records by id; malformed ones are skipped."""
    images: dict[int, tuple[int, str, int, int]] = {}
    for index, img in enumerate(coco["images"]):
        record = _image_record(img)
        if isinstance(record, str):
            image_id = _int_id(img.get("id")) if isinstance(img, dict) else None
            name = img.get("file_name", "") if isinstance(img, dict) else ""
            plan.skipped.append(Skip(_or_minus_one(image_id), -1, str(name), BAD_IMAGE_RECORD, f"images[{index}]",
                                     record))
        elif record[0] in images:  # the first record of an id wins, the same as gt_subset's
            if record != images[record[0]]:
                plan.skipped.append(Skip(record[0], -1, record[1], DUPLICATE_ID, f"images[{index}]"))
        else:
            images[record[0]] = record
    return images


def _gt_candidates(coco: dict[str, Any], split: str, images: dict, plan: SplitPlan,
                   person: int) -> dict[int, list]:
    """Kept GT people (category ``person``) per image id (sorted by ann id); skips and exclusions in ``plan``."""
    per_image: dict[int, list[Instance]] = {}
    seen: set[int] = set()
    order = keypoint_order(coco)
    for index, ann in sorted(enumerate(coco["annotations"]), key=lambda pair: _ann_sort_key(pair[1])):
        where = f"annotations[{index}]"
        if not isinstance(ann, dict):
            plan.skipped.append(Skip(-1, -1, "", BAD_RECORD, where, _id_problem(ann, ())))
            continue
        if _int_id(ann.get("category_id")) != person:
            continue
        ann_id, image_id = _int_id(ann.get("id")), _int_id(ann.get("image_id"))
        if ann_id is None or image_id is None:
            plan.skipped.append(Skip(_or_minus_one(image_id), _or_minus_one(ann_id), "", BAD_RECORD, where,
                                     _id_problem(ann, ("id", "image_id"))))
            continue
        if ann_id in seen:  # the first (in file order: the sort is stable) wins, as in gt_subset
            plan.skipped.append(Skip(image_id, ann_id, "", DUPLICATE_ID, where))
            continue
        seen.add(ann_id)
        if image_id not in images:
            plan.skipped.append(Skip(image_id, ann_id, "", UNKNOWN_IMAGE, where))
            continue
        _, name, width, height = images[image_id]
        if ann.get("iscrowd", 0):
            plan.excluded["crowd"] += 1
            continue
        result = _gt_instance(ann, split, (width, height), order)
        if isinstance(result, str):
            plan.skipped.append(Skip(image_id, ann_id, name, result, where))
        elif result is None:
            plan.excluded["no_keypoints"] += 1
        else:
            per_image.setdefault(image_id, []).append(result)
            plan.area_from_box += not _has_area(ann.get("area"))
    return per_image


def _ann_sort_key(ann: Any) -> tuple[int, str]:
    """Annotations in id order (malformed ones last, in a stable order)."""
    ann_id = _int_id(ann.get("id")) if isinstance(ann, dict) else None
    return (ann_id, "") if ann_id is not None else (2**62, repr(ann)[:200])


def _det_candidates(detections: list[dict[str, Any]], thr: float, images: dict, plan: SplitPlan,
                    person: int) -> dict:
    """Detections of category ``person`` (or none given) scoring >= ``thr`` per image id (highest score first)."""
    per_image: dict[int, list[Instance]] = {}
    order = sorted(range(len(detections)), key=lambda i: (-_score(detections[i]), i))
    for i in order:
        det = detections[i]
        image_id = _int_id(det.get("image_id"))
        if "category_id" in det and _int_id(det["category_id"]) != person:
            plan.excluded["other_category"] += 1  # e.g. a COCO detector's person id 1 on a file where person is 3
            continue
        if image_id is None or not math.isfinite(_score(det)):
            problem = _id_problem(det, ("image_id",)) or f"score {det.get('score')!r} is not a finite number"
            plan.skipped.append(Skip(_or_minus_one(image_id), -1, "", BAD_RECORD, f"[{i}]", problem))
            continue
        if image_id not in images:
            plan.skipped.append(Skip(image_id, -1, "", UNKNOWN_IMAGE, f"[{i}]"))
            continue
        if _score(det) < thr:
            plan.excluded["below_score_threshold"] += 1
            continue
        _, name, width, height = images[image_id]
        result = _det_instance(det, (width, height))
        if isinstance(result, str):
            plan.skipped.append(Skip(image_id, -1, name, result, f"[{i}]"))
        else:
            per_image.setdefault(image_id, []).append(result)
    return per_image


def _score(det: dict[str, Any]) -> float:
    """A detection's score as a float (NaN when it is not a number)."""
    try:
        return float(det.get("score"))
    except (TypeError, ValueError):
        return math.nan


def plan_split(
    coco: dict[str, Any],
    split: str,
    detections: list[dict[str, Any]] | None = None,
    det_score_thr: float = 0.0,
) -> SplitPlan:
    """The image tasks of ``split`` (sorted by image id) with the people each keeps, per the COCO rules.

    ``detections`` (val only) replaces the GT boxes as the people to crop.
    """
    _check_split(split)
    if detections is not None and split != "val":
        raise ValueError("detections are a box source for the val split only")
    plan = SplitPlan(tasks=[])
    images = _images(coco, plan)
    person = person_category_id(coco)
    if detections is None:
        per_image = _gt_candidates(coco, split, images, plan, person)
        plan.gt_images = set(per_image)
    else:  # the GT still goes to annotations.json for pycocotools: its broken records are skipped too
        gt_check = SplitPlan(tasks=[])
        plan.gt_images = set(_gt_candidates(coco, split, images, gt_check, person))
        plan.skipped += gt_check.skipped
        plan.area_from_box = gt_check.area_from_box  # the GT (its areas) is what pycocotools scores against
        before = len(plan.skipped)
        per_image = _det_candidates(detections, det_score_thr, images, plan, person)
        plan.detection_skips = len(plan.skipped) - before
    for image_id in sorted(per_image):
        _, name, width, height = images[image_id]
        plan.tasks.append(ImageTask(image_id, name, width, height, tuple(per_image[image_id])))
    return plan


def gt_subset(coco: dict[str, Any], image_ids: set[int], drop_ann_ids: set[int]) -> dict[str, Any]:
    """The COCO file's people restricted to ``image_ids`` (minus ``drop_ann_ids``), for pycocotools.

    The person category is written with COCO's id 1 (:data:`PERSON`), which
    the evaluation's results use.

    Crowd annotations of those images stay: pycocotools uses them as ignore
    regions. Records go through :func:`evaluation_record`; of duplicate ids
    the first record is kept (as :func:`plan_split` keeps it).
    """
    person = person_category(coco)
    person_id, order = _int_id(person["id"]), keypoint_order(coco)
    if order is not None:  # the records are rewritten in COCO order: so is the category
        person = {**person, "keypoints": COCO_PERSON_CATEGORY["keypoints"], "skeleton": COCO_PERSON_CATEGORY["skeleton"]}
    images = _first_per_id((image_id, img) for img in coco["images"] if not isinstance(_image_record(img), str)
                           and (image_id := _int_id(img.get("id"))) in image_ids)  # the record plan_split used
    anns = _first_per_id(
        (ann_id, record)
        for a in coco["annotations"]
        if isinstance(a, dict)
        and _int_id(a.get("category_id")) == person_id
        and _int_id(a.get("image_id")) in image_ids
        and (ann_id := _int_id(a.get("id"))) is not None
        and ann_id not in drop_ann_ids
        and (record := evaluation_record(a, order)) is not None
    )
    subset = {key: coco[key] for key in ("info", "licenses") if key in coco}
    subset.update(
        images=sorted(images, key=lambda i: i["id"]),
        annotations=sorted(anns, key=lambda a: a["id"]),
        categories=[{**person, "id": PERSON}],
    )
    return subset


def _first_per_id(records: Any) -> list[dict[str, Any]]:
    """``(id, record)`` pairs as records in order, each id once (the first record of a repeated id)."""
    out: dict[int, dict[str, Any]] = {}
    for record_id, record in records:
        if record_id not in out:
            out[record_id] = record if record["id"] == record_id and type(record["id"]) is int \
                else {**record, "id": record_id}
    return list(out.values())


def evaluation_record(ann: dict[str, Any], order: np.ndarray | None = None) -> dict[str, Any] | None:
    """``ann`` with what pycocotools' keypoint evaluation reads filled in; None without a usable box.

    COCO-format files from other tools often omit ``iscrowd``, ``area`` or
    ``num_keypoints``, which COCOeval indexes directly (a KeyError there).
    Present, valid values are kept; the box is written as numbers and the
    category as COCO's person id (:data:`PERSON`, whatever the source's). Non-crowd
    records are those :func:`plan_split` checked (their keypoints parse;
    unlabelled joints written as ``null`` or NaN become 0, 0, 0); a crowd
    region without valid keypoints gets all-zero ones (COCOeval reads them).
    Joints are put in COCO ``order`` (:func:`keypoint_order`); an area that is
    not a positive number becomes the box's (:func:`_area`).
    """
    box = parse_box(ann.get("bbox"))
    if box is None:
        return None
    record = {**ann, "bbox": list(box), "iscrowd": 1 if ann.get("iscrowd") else 0, "category_id": PERSON}
    if type(ann.get("image_id")) is not int:
        record["image_id"] = _int_id(ann.get("image_id"))
    keypoints = parse_keypoints(ann.get("keypoints"), order)
    if keypoints is None:  # a crowd region: non-crowd records reaching here passed plan_split
        record["keypoints"] = [0] * (3 * NUM_KEYPOINTS)
    elif order is not None or not all(isinstance(v, int | float) and math.isfinite(v) for v in ann["keypoints"]):
        record["keypoints"] = keypoints.reshape(-1).tolist()  # COCO order; null/NaN of unlabelled joints as 0
    area = _area(ann.get("area"), box)
    if area != ann.get("area"):
        record["area"] = area
    if _int_id(ann.get("num_keypoints")) is None:
        record["num_keypoints"] = sum(1 for v in record["keypoints"][2::3] if v > 0)
    return record
