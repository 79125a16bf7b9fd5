"""``cal-pose downsample``: COCO (local or s3://) -> low-resolution parquet shards per input size.

For one split, every kept person (:mod:`cal_core.data.coco` rules) becomes one
row per requested input size: an anti-aliased crop of ``margin`` times the
padded box (:mod:`cal_core.data.crops`), its keypoints in crop pixels and the
crop -> image affine. Output: ``<out>/<HxW>/{manifest.json, annotations.json,
shard-*.parquet}`` (:mod:`cal_core.data.shards`).

The margin (1.5 by default) is a trade-off. Training augments the stored
crop with scales up to 1.35 and rotations (sd 45 degrees, clipped at 90);
a view of the box zoomed out 1.35x and turned 45 degrees spans
``1.35 * (|cos| + |sin| * h / w)`` ~ 2.2 box widths and ~1.7 box heights at
64x48, more than 1.5 stores, and gets black corners where the authors' warp
from the whole image shows background. Measured on coco-mini val at 64x48
over 20 epochs of the training draws: with 1.5, 22% of samples have some
black pixel where the image had content, 1.1% of input pixels on average
(12.5% at 1.35x and 45 degrees); with 1.75, 12% and 0.29%; with 2.0, 6% and
0.05%, for 1.55x the shard bytes (and a slower cut). ``--margin`` sets it.

Work and reliability:

- images are decoded once for all sizes, in worker processes (consumed in
  order, so rows and shards are deterministic), with a bounded number in
  flight; shards stream out as they fill (never the whole set in memory); a
  worker killed mid-run (out of memory) stops the run with an error naming
  the image, instead of a hang;
- every write is atomic; after each shard a journal (``_progress.json``)
  records the finished shards and where the next one starts; the manifest
  is written last. A rerun verifies existing shards (rows + sha256) and only
  computes from the first missing one: a complete set is left untouched, a
  killed run resumes and ends with the same bytes as an uninterrupted one;
- malformed records and unreadable images are skipped and listed with the
  reason in the manifest; ``strict`` turns the first one into an error. A
  split that keeps no person at all is an error with the skip counts, not
  an empty set that would fail later in training.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from cal_core import storage
from cal_core.cli import StageFailed
from cal_core.data import coco, crops, shards
from cal_core.geometry import DEFAULT_PADDING, affine_points, invert_affine

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 1.5
DEFAULT_SHARD_SIZE = 2000
JPEG_QUALITY = 95
#: Skip reasons decided while decoding (the others come from the annotation file).
IMAGE_REASONS = (coco.MISSING_FILE, coco.CORRUPT_IMAGE, coco.TOO_LARGE, coco.SIZE_MISMATCH)
#: Images handed to the pool but not yet consumed, per worker (bounds memory).
IN_FLIGHT_PER_WORKER = 8
#: prctl option: the signal a process gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


class DownsampleError(ValueError):
    """A skip under ``strict`` or invalid settings; the message names the record and file."""


class WorkerCrashError(StageFailed):
    """A worker process died mid-run; the message names the image it may have died on."""


@dataclass(frozen=True)
class Job:
    """What a worker needs besides the image: sizes, geometry settings and where images live."""

    sizes: tuple[tuple[int, int], ...]
    margin: float
    padding: float
    image_root: str
    max_pixels: int = crops.DEFAULT_MAX_PIXELS


@dataclass
class ImageResult:
    """A worker's answer for one image: rows per size (column dicts), or why it was skipped.

    ``sha256`` is the digest of an unusable file's bytes, so a rerun can tell whether it was replaced.
    """

    task: coco.ImageTask
    rows: list[list[dict[str, Any]]]
    reason: str | None = None
    detail: str = ""
    sha256: str | None = None


_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    """Pool initializer: the job settings every task of this run shares; die with the parent (Linux)."""
    global _JOB
    _JOB = job
    _die_with_parent()


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when the stage's process dies (Linux ``PR_SET_PDEATHSIG``).

    A stage killed by SIGTERM or SIGKILL (a timeout, Ctrl-C of a wrapper, the
    OOM killer) gets no chance to shut its pool down; without this its
    workers live on as orphans blocked on a pipe nobody reads.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _row(task: coco.ImageTask, inst: coco.Instance, matrix: np.ndarray, pixels: np.ndarray) -> dict[str, Any]:
    """One shard row for a rendered person (keypoints of unlabelled joints stay 0, 0, 0)."""
    visibility = inst.keypoints[:, 2:]
    xy = affine_points(inst.keypoints[:, :2], matrix) * (visibility > 0)
    kp = np.concatenate([xy, visibility], axis=1).astype(np.float32)
    return {"image_id": task.image_id, "ann_id": inst.ann_id, "file_name": task.file_name,
            "crop": crops.encode_jpeg(pixels, JPEG_QUALITY), "crop_height": pixels.shape[0],
            "crop_width": pixels.shape[1], "keypoints": kp.reshape(-1).tolist(),
            "crop_to_image": invert_affine(matrix).reshape(-1).tolist(), "bbox": list(inst.bbox),
            "area": inst.area, "score": inst.score, "num_keypoints": inst.num_keypoints}


def process_image(task: coco.ImageTask, job: Job | None = None) -> ImageResult:
    """Read and decode one image once, then render every person at every size."""
    job = job or _JOB
    if job is None:
        raise RuntimeError("process_image needs a Job (or a pool started with _init_worker)")
    uri = storage.join(job.image_root, task.file_name)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        return ImageResult(task, [], coco.MISSING_FILE, str(exc))
    matrices = [[crops.crop_matrix(inst.bbox, size, job.margin, job.padding) for inst in task.instances]
                for size in job.sizes]
    min_step = min(crops.source_step(m) for per_size in matrices for m in per_size)
    try:
        decoded = crops.decode(data, min_step, job.max_pixels)
    except crops.ImageTooLargeError as exc:
        return ImageResult(task, [], coco.TOO_LARGE, str(exc), shards.sha256(data))
    except crops.ImageDecodeError as exc:
        return ImageResult(task, [], coco.CORRUPT_IMAGE, str(exc), shards.sha256(data))
    if decoded.size != (task.width, task.height):
        turned = decoded.size == (task.height, task.width)
        hint = (" (turned: the stored pixels are used, EXIF orientation is ignored, as COCO's annotations "
                "expect; annotate the stored pixels)") if turned else ""
        return ImageResult(task, [], coco.SIZE_MISMATCH,
                           f"image is {decoded.size[0]}x{decoded.size[1]} (WxH), the annotations say "
                           f"{task.width}x{task.height}{hint}", shards.sha256(data))
    rows = []
    for size, per_size in zip(job.sizes, matrices, strict=True):
        crop_h, crop_w = crops.crop_size(size, job.margin)
        rows.append([_row(task, inst, m, crops.render(decoded, m, (crop_w, crop_h)))
                     for inst, m in zip(task.instances, per_size, strict=True)])
    return ImageResult(task, rows)


def _results(tasks: Sequence[coco.ImageTask], job: Job, workers: int) -> Iterator[ImageResult]:
    """:func:`process_image` over ``tasks`` in order, in worker processes with a bounded number in flight.

    The window keeps finished-but-unconsumed results (crops of every size)
    bounded. A worker that dies (killed when out of memory, a crash in a
    decoder) is a :class:`WorkerCrashError`, not a hang; the journal lets a
    rerun resume. If the consumer stops early (error, strict skip), queued
    images are cancelled.
    """
    if workers <= 1:
        for task in tasks:
            yield process_image(task, job)
        return
    queue = iter(tasks)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_worker, initargs=(job,))
    pending: deque = deque()
    current = None  # the image whose result is awaited: the first suspect of a crash
    try:
        for task in itertools.islice(queue, IN_FLIGHT_PER_WORKER * workers):
            pending.append((task, pool.submit(process_image, task)))
        while pending:
            current, future = pending.popleft()
            result = future.result()
            current = None
            for nxt in itertools.islice(queue, 1):  # submit raises too once a worker has died
                pending.append((nxt, pool.submit(process_image, nxt)))
            yield result
    except BrokenProcessPool as exc:
        suspect = current or (pending[0][0] if pending else None)
        named = f"{suspect.file_name} (image {suspect.image_id}) or a later image" if suspect else "an image"
        raise WorkerCrashError(
            f"a downsampling worker process died (killed, e.g. out of memory, or crashed) with {named} in "
            "flight; rerun the same command to resume from the last complete shard") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Output:
    """One input size's shard set being written: its folder, finished shards and row buffer."""

    size: tuple[int, int]
    uri: str
    previous: list[dict[str, Any]]
    shards: list[dict[str, Any]] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=lambda: {c: [] for c in shards.COLUMNS})
    written: int = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to the current (unwritten) shard."""
        for row in rows:
            for name in shards.COLUMNS:
                self.columns[name].append(row[name])

    def flush(self, start: list[Any]) -> None:
        """Write the buffered rows as the next shard (skipped if an identical file is already there)."""
        index = len(self.shards)
        data = shards.shard_bytes(self.columns)
        entry = {"path": shards.shard_name(index), "rows": len(self.columns["image_id"]),
                 "sha256": shards.sha256(data), "start": start}
        old = self.previous[index] if index < len(self.previous) else None
        if not (old and old["sha256"] == entry["sha256"] and shards.shard_is_complete(self.uri, old)):
            storage.write_bytes(storage.join(self.uri, entry["path"]), data)
            self.written += 1
        self.shards.append(entry)
        self.columns = {c: [] for c in shards.COLUMNS}


@dataclass
class _Previous:
    """What an earlier run left in one size folder: finished shards, where to go on, and its skips."""

    shards: list[dict[str, Any]]
    next: list[Any] | None
    skipped: list[dict[str, Any]]
    complete: bool
    annotations_sha256: str | None = None


def _header(size: tuple[int, int], split: str, margin: float, source: dict, settings: dict) -> dict[str, Any]:
    """Manifest fields that must match for earlier output to be reused."""
    crop_h, crop_w = crops.crop_size(size, margin)
    return {"schema_version": shards.SCHEMA_VERSION, "split": split, "input_size": list(size),
            "crop_size": [crop_h, crop_w], "margin": margin, "crop_format": shards.CROP_FORMAT,
            "source": source, "settings": settings}


def _previous(uri: str, header: dict[str, Any]) -> _Previous:
    """The reusable state of ``uri``: its manifest, else its journal, if made with the same header."""
    for name, complete in ((shards.MANIFEST, True), (shards.PROGRESS, False)):
        path = storage.join(uri, name)
        if not storage.exists(path):
            continue
        try:
            doc = shards.read_json_file(path)
        except shards.ShardError as exc:
            log.warning("ignoring %s", exc)
            continue
        if isinstance(doc, dict) and all(doc.get(k) == v for k, v in header.items()):
            return _Previous(doc.get("shards", []), doc.get("next"), doc.get("skipped", []), complete,
                             (doc.get("annotations") or {}).get("sha256"))
        log.info("%s was made from other inputs or settings: recomputing", path)
    return _Previous([], None, [], False)


def _verified_prefix(uri: str, entries: list[dict[str, Any]]) -> int:
    """How many leading shard entries exist on storage with their recorded rows and sha256."""
    for i, entry in enumerate(entries):
        if not shards.shard_is_complete(uri, entry):
            return i
    return len(entries)


def _strict_error(skip: coco.Skip, where: str, detail: str = "") -> DownsampleError:
    """The ``strict`` error for a skip: the file (``where``), the record and the reason."""
    what = f"image {skip.image_id} ({skip.file or 'no file'}), annotation {skip.ann_id}"
    what = f"{skip.record}: {what}" if skip.record else what
    detail = detail or skip.detail
    return DownsampleError(f"{where}: {what}: {skip.reason}{': ' + detail if detail else ''} "
                           "(--strict turns skipped records into errors)")


@dataclass
class _Writer:
    """Cuts the ordered row stream into shards of ``shard_size`` rows for every output size.

    ``point`` is where a rerun would have to start to produce the current
    (unflushed) shard: ``[image_id, rows of that image already in earlier shards]``,
    or None once every image has been consumed.
    """

    outputs: list[Output]
    header: dict[tuple[int, int], dict[str, Any]]
    shard_size: int
    plan_skips: list[dict[str, Any]]
    image_skips: list[dict[str, Any]]
    point: list[Any] | None
    buffered: int = 0

    def consume(self, result: ImageResult, first_row: int, next_point: list[Any] | None) -> None:
        """Buffer the image's rows from ``first_row`` on, flushing every full shard."""
        n = len(result.rows[0]) if result.rows else 0
        i = first_row
        while i < n:
            take = min(n - i, self.shard_size - self.buffered)
            for out, rows in zip(self.outputs, result.rows, strict=True):
                out.add(rows[i:i + take])
            self.buffered += take
            i += take
            if self.buffered == self.shard_size:
                self.flush([result.task.image_id, i] if i < n else next_point)
        if self.buffered == 0:
            self.point = next_point

    def flush(self, next_point: list[Any] | None) -> None:
        """Write the current shard in every size, then each size's journal."""
        for out in self.outputs:
            out.flush(self.point)
            journal = {**self.header[out.size], "shards": out.shards, "next": next_point,
                       "skipped": self.plan_skips + self.image_skips}
            storage.write_bytes(storage.join(out.uri, shards.PROGRESS), shards.json_bytes(journal))
        self.buffered = 0
        self.point = next_point


def _is_done(out: Output, prev: _Previous) -> bool:
    """True if ``out`` already holds a complete shard set for the same inputs and settings."""
    if not prev.complete or _verified_prefix(out.uri, prev.shards) != len(prev.shards):
        return False
    path = storage.join(out.uri, shards.ANNOTATIONS)
    try:
        return shards.sha256(storage.read_bytes(path)) == prev.annotations_sha256
    except FileNotFoundError:
        return False


def _resume(outputs: list[Output], prevs: list[_Previous],
            tasks: list[coco.ImageTask]) -> tuple[list[Any] | None, list[dict[str, Any]]]:
    """Keep the shards every size has verified; return where to go on and the image skips before it."""
    done = min(_verified_prefix(out.uri, prev.shards) for out, prev in zip(outputs, prevs, strict=True))
    for out, prev in zip(outputs, prevs, strict=True):
        out.previous = prev.shards
        out.shards = list(prev.shards[:done])
    start = [tasks[0].image_id, 0] if tasks else None
    if done == 0:
        return start, []
    doc = next((p for p in prevs if len(p.shards) > done), None)
    point = doc.shards[done]["start"] if doc else next(p for p in prevs if len(p.shards) == done).next
    doc = doc or next(p for p in prevs if len(p.shards) == done)
    position = {t.image_id: i for i, t in enumerate(tasks)}
    if point is not None and point[0] not in position:
        for out in outputs:
            out.shards = []
        return start, []
    stop = len(tasks) if point is None else position[point[0]]
    restored = [s for s in doc.skipped if s.get("reason") in IMAGE_REASONS
                and position.get(s.get("image_id"), len(tasks)) < stop]
    return point, restored


def _image_skips(result: ImageResult, image_root: str, strict: bool) -> list[dict[str, Any]]:
    """Skip entries for every person of an image that could not be used (an error under ``strict``)."""
    skips = [coco.Skip(result.task.image_id, inst.ann_id, result.task.file_name, result.reason or "",
                       detail=result.detail) for inst in result.task.instances]
    if strict:
        raise _strict_error(skips[0], storage.join(image_root, result.task.file_name), result.detail)
    log.warning("skipping image %s (%s): %s: %s", result.task.image_id, result.task.file_name, result.reason,
                result.detail)
    digest = {"sha256": result.sha256} if result.sha256 else {}
    return [{**s.to_dict(), **digest} for s in skips]


def _images_replaced(skipped: list[dict[str, Any]], image_root: str) -> list[str]:
    """Files an earlier run skipped as missing or unreadable that are now there or different.

    A finished set is keyed on the annotation file and the settings, not on
    every image; but after the manifest named broken images, replacing them
    and rerunning the same command is the natural fix, so those few files
    are checked again (a missing one for existence, an unreadable one
    against the sha256 recorded when it was skipped).
    """
    entries = {s["file"]: s for s in reversed(skipped) if s.get("reason") in IMAGE_REASONS and s.get("file")}
    replaced = []
    for name, entry in entries.items():
        uri = storage.join(image_root, name)
        if entry["reason"] == coco.MISSING_FILE:
            changed = storage.exists(uri)
        elif "sha256" in entry:
            try:
                changed = shards.sha256(storage.read_bytes(uri)) != entry["sha256"]
            except FileNotFoundError:
                changed = True
        else:
            continue  # recorded before digests were: nothing to compare with
        if changed:
            replaced.append(name)
    return replaced


def _kept_images(plan: coco.SplitPlan, image_skips: list[dict[str, Any]]) -> set[int]:
    """Images whose ground truth goes to annotations.json.

    Those with at least one row, plus (with detections as the box source)
    every image with a kept GT person but no detection, so missed people
    count against AP.
    """
    tasked = {t.image_id for t in plan.tasks}
    return (tasked - {s["image_id"] for s in image_skips}) | (plan.gt_images - tasked)


def _nothing_kept(where: str, skipped: list[dict[str, Any]], excluded: Counter) -> DownsampleError:
    """The error for a split that yields no person at all (an empty set would only fail later, in training).

    Nothing is written in that case, so the first skipped records are named here.
    """
    reasons = dict(sorted(Counter(s["reason"] for s in skipped).items()))
    first = "; ".join(f"{s.get('record') or s.get('file') or 'image ' + str(s['image_id'])}: {s['reason']}"
                      + (f" ({s['detail']})" if s.get("detail") else "") for s in skipped[:3])
    return DownsampleError(f"{where}: no person instance kept: skipped {reasons}, excluded "
                           f"{dict(sorted(excluded.items()))}{f' (first: {first})' if first else ''}")


def _finish(writer: _Writer, gt: dict[str, Any], plan: coco.SplitPlan) -> None:
    """Last shard, annotations.json, then the manifest; drop the journal and stale files."""
    if writer.buffered:
        writer.flush(None)
    if not any(e["rows"] for e in writer.outputs[0].shards):
        raise _nothing_kept(writer.header[writer.outputs[0].size]["source"]["images"],
                            writer.plan_skips + writer.image_skips, plan.excluded)
    kept = _kept_images(plan, writer.image_skips)
    # a duplicate's id is also its kept first record's: only the other skips leave the GT
    drop = {s.ann_id for s in plan.skipped if s.ann_id >= 0 and s.reason != coco.DUPLICATE_ID}
    annotations = shards.json_bytes(coco.gt_subset(gt, kept, drop), compact=True)
    skipped = writer.plan_skips + writer.image_skips
    for out in writer.outputs:
        storage.write_bytes(storage.join(out.uri, shards.ANNOTATIONS), annotations)
        counts = {"images": len(kept), "instances": sum(e["rows"] for e in out.shards),
                  "skipped": dict(sorted(Counter(s["reason"] for s in skipped).items())),
                  "excluded": dict(sorted(plan.excluded.items())), "area_from_box": plan.area_from_box}
        manifest = {**writer.header[out.size], "shards": out.shards, "counts": counts, "skipped": skipped,
                    "annotations": {"path": shards.ANNOTATIONS, "sha256": shards.sha256(annotations)}}
        storage.write_bytes(storage.join(out.uri, shards.MANIFEST), shards.json_bytes(manifest))
        _remove_stale(out)


def _remove_stale(out: Output) -> None:
    """Delete the journal, shards the manifest does not list, and temp files of killed writes."""
    listed = {e["path"] for e in out.shards}
    for uri in storage.list_prefix(out.uri):
        name = uri.rsplit("/", 1)[-1]
        relative = uri[len(out.uri.rstrip("/")) + 1:]
        if "/" in relative:
            continue
        stale_shard = name.startswith("shard-") and name.endswith(".parquet") and name not in listed
        temp = name.startswith(".") and name.endswith(".tmp")
        if stale_shard or temp or name == shards.PROGRESS:
            storage.delete(uri)


@dataclass(frozen=True)
class Layout:
    """Where a split's annotation file and images are, relative to the COCO root unless absolute or URIs.

    ``None``: COCO 2017's ``annotations/person_keypoints_<split>2017.json`` and ``<split>2017/``.
    """

    ann_file: str | None = None
    image_dir: str | None = None


def _load_inputs(coco_uri: str, split: str, detections: str | None, det_score_thr: float,
                 layout: Layout) -> tuple[dict[str, Any], coco.SplitPlan, dict[str, Any]]:
    """The annotation file, the split's plan and the ``source`` manifest entry (canonical URIs and sha256)."""
    coco_uri = storage.canonical(coco_uri)
    detections = storage.canonical(detections) if detections else None
    ann_uri = coco.annotation_uri(coco_uri, split, layout.ann_file)
    data, raw = coco.read_json(ann_uri)
    gt = coco.check_coco(data, ann_uri)
    source = {"annotations": {"uri": ann_uri, "sha256": shards.sha256(raw)},
              "images": coco.image_root(coco_uri, split, layout.image_dir)}
    dets = None
    if detections:
        det_data, det_raw = coco.read_json(detections)
        dets = coco.check_detections(det_data, detections)
        source["detections"] = {"uri": detections, "sha256": shards.sha256(det_raw)}
    return gt, coco.plan_split(gt, split, dets, det_score_thr), source


def downsample(coco_uri: str, split: str, out: str, input_sizes: Sequence[str | tuple[int, int]],
               detections: str | None = None, det_score_thr: float = 0.0,
               shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None,
               margin: float = DEFAULT_MARGIN, strict: bool = False,
               progress: bool = True, layout: Layout = Layout(),
               max_image_pixels: int = crops.DEFAULT_MAX_PIXELS) -> dict[str, dict[str, Any]]:
    """Write ``<out>/<HxW>/`` shard sets for ``split`` of the COCO root ``coco_uri``; returns a report per size.

    The report says per size where the set is, how many shards it has, how
    many this call wrote (0 when everything was already complete) and the
    manifest counts. See the module docstring for resume and skip behaviour.
    """
    sizes = tuple(dict.fromkeys(shards.parse_size(s) for s in input_sizes))
    if not sizes or not margin >= 1 or not math.isfinite(margin) or shard_size < 1:
        raise DownsampleError(f"need >= 1 input size, margin >= 1 and shard_size >= 1, got {input_sizes}, "
                              f"{margin}, {shard_size}")
    if math.isnan(det_score_thr):
        raise DownsampleError("det_score_thr is NaN: give a number (detections scoring at least it are kept)")
    if max_image_pixels < 0:
        raise DownsampleError(f"max_image_pixels must be >= 0 (0: no limit), got {max_image_pixels}")
    _warn_settings(sizes, detections, det_score_thr)
    settings = {"padding": DEFAULT_PADDING, "shard_size": shard_size, "jpeg_quality": JPEG_QUALITY,
                "box_source": "detections" if detections else "ground_truth", "det_score_thr": det_score_thr,
                "resampling": "opencv jpeg-dct-scale + box-reduce + bilinear", "max_image_pixels": max_image_pixels}
    storage.check_writable(out)  # an unwritable out fails now, not at the first shard after decoding
    with storage.exclusive(out, "downsampling"):  # a second run into the same out is refused, not interleaved
        return _cut(coco_uri, split, out, sizes, detections, settings, workers, margin, strict, progress, layout)


def _cut(coco_uri: str, split: str, out: str, sizes: tuple[tuple[int, int], ...], detections: str | None,
         settings: dict[str, Any], workers: int | None, margin: float, strict: bool, progress: bool,
         layout: Layout) -> dict[str, dict[str, Any]]:
    """:func:`downsample` once its ``settings`` (the manifest's) are checked and ``out`` is locked."""
    gt, plan, source = _load_inputs(coco_uri, split, detections, settings["det_score_thr"], layout)
    _warn_skipped_records(plan, " and ".join(filter(None, (source["annotations"]["uri"], detections))))
    _warn_box_areas(plan, source["annotations"]["uri"])
    if strict and plan.skipped:
        from_detections = len(plan.skipped) == plan.detection_skips  # annotation-file skips come first
        raise _strict_error(plan.skipped[0], detections if from_detections else source["annotations"]["uri"])
    if not plan.tasks:
        raise _nothing_kept(detections or source["annotations"]["uri"], [s.to_dict() for s in plan.skipped],
                            plan.excluded)
    header = {size: _header(size, split, margin, source, settings) for size in sizes}
    outputs = [Output(size, storage.join(out, shards.size_name(size)), []) for size in sizes]
    prevs = [_previous(o.uri, header[o.size]) for o in outputs]
    replaced = _images_replaced([s for p in prevs for s in p.skipped], source["images"])  # each file read once
    if replaced:
        log.info("images skipped before are now there or replaced (%s): recomputing", ", ".join(sorted(replaced)[:5]))
        prevs = [_Previous([], None, [], False) for _ in prevs]
    if all(_is_done(o, p) for o, p in zip(outputs, prevs, strict=True)):
        log.info("%s: all shards already complete for %s", out, ", ".join(map(shards.size_name, sizes)))
        return _report(outputs, prevs, already_complete=True)
    point, restored = _resume(outputs, prevs, plan.tasks)
    for o in outputs:  # a manifest on storage always describes a complete set: drop it until rewritten
        storage.delete(storage.join(o.uri, shards.MANIFEST))
    writer = _Writer(outputs, header, settings["shard_size"], [s.to_dict() for s in plan.skipped], restored, point)
    job = Job(sizes, margin, DEFAULT_PADDING, source["images"], settings["max_image_pixels"])
    _run_tasks(writer, plan, job, workers, strict, progress)
    _finish(writer, gt, plan)
    return _report(outputs, [_previous(o.uri, header[o.size]) for o in outputs], already_complete=False)


def _warn_settings(sizes: Sequence[tuple[int, int]], detections: str | None, det_score_thr: float) -> None:
    """Warn about settings that are valid here but surprise later: odd sizes, a threshold without detections."""
    odd = [shards.size_name(size) for size in sizes if size[0] % 4 or size[1] % 4]
    if odd:
        log.warning("input size %s: the pose models need sides that are multiples of 4 (heatmaps are input/4), "
                    "so `cal-pose train` will refuse these shards", ", ".join(odd))
    if det_score_thr and not detections:
        log.warning("--det-score-thr %g does nothing without --detections (ground-truth boxes are all kept)",
                    det_score_thr)


def _warn_skipped_records(plan: coco.SplitPlan, where: str) -> None:
    """Warn with the count per reason when records of the annotation (or detections) file are skipped.

    A file numbering annotation ids per image instead of file-wide once lost
    89% of its people as ``duplicate_id`` with only an INFO line at the end.
    """
    if not plan.skipped:
        return
    reasons = dict(sorted(Counter(s.reason for s in plan.skipped).items()))
    hint = " (COCO ids are unique in the whole file: numbered per image?)" if coco.DUPLICATE_ID in reasons else ""
    log.warning("%s: %d records skipped %s%s; the manifest's 'skipped' lists each", where, len(plan.skipped),
                reasons, hint)


def _warn_box_areas(plan: coco.SplitPlan, where: str) -> None:
    """Say how many kept people have no positive ``area`` in ``where`` (their box area stands in).

    COCOeval's OKS scale is the area; a box's is roughly 1.5-2x a person's
    segmentation area, so OKS is more lenient and AP is not comparable with
    AP on areas from segmentations (COCO's). Counted in the manifest too.
    """
    if plan.area_from_box:
        log.warning("%s: %d kept people have no positive area: their box area (w x h) is COCOeval's OKS scale "
                    "for them, more lenient than a segmentation area (AP is then not comparable with AP on "
                    "COCO's areas)", where, plan.area_from_box)


def _run_tasks(writer: _Writer, plan: coco.SplitPlan, job: Job, workers: int | None, strict: bool,
               progress: bool) -> None:
    """Process the images from the writer's resume point on, feeding rows and skips to the writer."""
    tasks = plan.tasks
    start, first_row = len(tasks), 0  # no point: every image was consumed before
    if writer.point is not None:
        start = next(i for i, t in enumerate(tasks) if t.image_id == writer.point[0])
        first_row = int(writer.point[1])
    todo = tasks[start:]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(todo), unit="img", desc="downsample", disable=not progress)
    for offset, result in enumerate(_results(todo, job, workers)):
        position = start + offset
        next_point = [tasks[position + 1].image_id, 0] if position + 1 < len(tasks) else None
        if result.reason:
            writer.image_skips.extend(_image_skips(result, job.image_root, strict))
        writer.consume(result, first_row if offset == 0 else 0, next_point)
        bar.update(1)
    bar.close()


def _report(outputs: list[Output], prevs: list[_Previous], already_complete: bool) -> dict[str, dict[str, Any]]:
    """Per size: URI, shard count, shards written by this call and the manifest counts."""
    report = {}
    for out, prev in zip(outputs, prevs, strict=True):
        manifest = shards.read_manifest(out.uri)
        report[shards.size_name(out.size)] = {
            "uri": out.uri, "shards": len(prev.shards), "written": 0 if already_complete else out.written,
            "already_complete": already_complete, "counts": manifest["counts"]}
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cal-pose downsample`` flags (docs/architecture.md, CLI contract)."""
    add = parser.add_argument
    add("--coco", required=True, help="COCO root (local dir or s3://bucket/prefix): annotations/ + <split>2017/")
    add("--split", required=True, choices=coco.SPLITS,
        help="train (people with >= 1 labelled keypoint) or val (every person: the COCO rules)")
    add("--ann-file", default=None,
        help="the split's annotation JSON, relative to --coco unless absolute or a URI "
             "(default: annotations/person_keypoints_<split>2017.json)")
    add("--image-dir", default=None,
        help="folder the annotations' file_name values are relative to, relative to --coco unless absolute "
             "or a URI (default: <split>2017)")
    add("--out", required=True, help="output root; shards go to <out>/<HxW>/")
    add("--input-size", action="append", required=True, dest="input_sizes",
        help="network input HxW, e.g. 64x48 (repeat for several sizes; images are decoded once)")
    add("--detections", default=None, help="COCO results JSON of person detections (val): the boxes to crop")
    add("--det-score-thr", type=float, default=0.0, help="keep detections scoring at least this")
    add("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows (person instances) per shard")
    add("--workers", type=int, default=None, help="decoding processes (default: all CPU cores)")
    add("--margin", type=float, default=DEFAULT_MARGIN,
        help="crop = margin x the padded box, so augmentation has context (default 1.5)")
    add("--strict", action="store_true", help="fail on the first malformed or unreadable record instead of skipping")
    add("--max-image-pixels", type=int, default=crops.DEFAULT_MAX_PIXELS,
        help="skip images with more pixels as too_large, a decompression-bomb guard (default PIL's ~179 MP; "
             "0: no limit, e.g. for gigapixel frames: JPEGs decode at reduced size)")
    add("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the stage from parsed flags; prints one line per input size (errors: one line from cal_core.cli)."""
    params = {"coco": args.coco, "split": args.split, "ann_file": args.ann_file or "",
              "image_dir": args.image_dir or "", "out": args.out, "input_sizes": ",".join(args.input_sizes),
              "detections": args.detections or "", "det_score_thr": args.det_score_thr,
              "shard_size": args.shard_size, "margin": args.margin, "strict": args.strict,
              "max_image_pixels": args.max_image_pixels}
    report = _tracked_run(args, params)  # bad input: exit 2, a worker that died: exit 1 (cal_core.cli)
    for size, entry in report.items():
        counts = entry["counts"]
        state = "all already complete" if entry["already_complete"] else f"{entry['written']} written"
        print(f"{size}: {entry['uri']}: {entry['shards']} shards ({state}), {counts['instances']} instances "
              f"from {counts['images']} images, {sum(counts['skipped'].values())} skipped {counts['skipped']}")
    return 0


def _tracked_run(args: argparse.Namespace, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`downsample` from parsed flags inside an MLflow stage run (marked failed if it raises), counts logged."""
    from cal_core import tracking

    with tracking.stage_run("downsample", params=params) as tracker:
        report = downsample(args.coco, args.split, args.out, args.input_sizes, args.detections,
                            args.det_score_thr, args.shard_size, args.workers, args.margin, args.strict,
                            progress=not args.no_progress, layout=Layout(args.ann_file, args.image_dir),
                            max_image_pixels=args.max_image_pixels)
        for size, entry in report.items():
            counts = entry["counts"]
            tracker.log_metrics({f"{size}/instances": counts["instances"], f"{size}/images": counts["images"],
                                 f"{size}/skipped": sum(counts["skipped"].values()),
                                 f"{size}/shards_written": entry["written"]})
    return report
