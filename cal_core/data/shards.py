"""The shard format (schema version 1): parquet row schema, shard files and the manifest.

A shard set is one folder (or S3 prefix) per split and input size holding
``manifest.json``, ``annotations.json`` and ``shard-00000.parquet``... (one row
per person instance, zstd; docs/architecture.md, "Shard format"). This module
owns the byte layout: building a shard from rows, writing it atomically,
reading and verifying it back (rows and sha256 against the manifest), and the
manifest itself. :mod:`cal_core.data.downsample` writes shard sets with it;
readers use :func:`read_manifest`, :func:`shard_uris` and :func:`read_shard`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from cal_core import storage

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ANNOTATIONS = "annotations.json"
#: Journal of the shards finished so far by an unfinished run (removed when the manifest is written).
PROGRESS = "_progress.json"
CROP_FORMAT = "jpeg"

SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("ann_id", pa.int64()),
        ("file_name", pa.string()),
        ("crop", pa.binary()),
        ("crop_height", pa.int32()),
        ("crop_width", pa.int32()),
        ("keypoints", pa.list_(pa.float32())),
        ("crop_to_image", pa.list_(pa.float64())),
        ("bbox", pa.list_(pa.float32())),
        ("area", pa.float32()),
        ("score", pa.float32()),
        ("num_keypoints", pa.int32()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


class ShardError(ValueError):
    """A manifest or shard that is missing, unreadable or does not match the format; names the file."""


def size_name(size: tuple[int, int]) -> str:
    """``(64, 48)`` -> ``"64x48"`` (height x width), the folder name of that input size."""
    return f"{size[0]}x{size[1]}"


def parse_size(text: str | Sequence[int]) -> tuple[int, int]:
    """``"64x48"`` or ``[64, 48]`` -> ``(64, 48)``; both sides must be integers >= 2."""
    parts = text.lower().split("x") if isinstance(text, str) else list(text)
    try:
        height, width = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(f"input size must look like '64x48' (height x width), got {text!r}") from None
    if height < 2 or width < 2:
        raise ValueError(f"input size must be at least 2x2 pixels, got {text!r}")
    return height, width


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.parquet``."""
    return f"shard-{index:05d}.parquet"


def shard_bytes(columns: dict[str, list[Any]]) -> bytes:
    """One shard file (one row group, zstd) from column lists; the same rows give the same bytes."""
    table = pa.table(
        {name: pa.array(columns[name], type=SCHEMA.field(name).type) for name in COLUMNS}, schema=SCHEMA
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=False, row_group_size=max(1, len(table)))
    return sink.getvalue().to_pybytes()


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data`` (how shards and annotation files are identified)."""
    return hashlib.sha256(data).hexdigest()


def read_manifest(uri: str) -> dict[str, Any]:
    """``<uri>/manifest.json`` of a shard set; :class:`ShardError` naming the file if absent or wrong."""
    path = storage.join(uri, MANIFEST)
    manifest = read_json_file(path)
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ShardError(f"{path}: schema_version {version!r}, expected {SCHEMA_VERSION}")
    for key in ("input_size", "crop_size", "margin", "shards", "counts"):
        if key not in manifest:
            raise ShardError(f"{path}: missing {key!r}")
    return manifest


def read_json_file(path: str) -> Any:
    """Parsed JSON at ``path``; :class:`ShardError` naming it when missing or not JSON."""
    try:
        return json.loads(storage.read_bytes(path))
    except (OSError, storage.StorageError) as exc:
        raise ShardError(f"{path}: cannot read ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from exc


def json_bytes(data: Any, compact: bool = False) -> bytes:
    """Canonical JSON (sorted keys) so equal content gives equal bytes.

    Indented for humans by default; ``compact`` for big files (COCO ground
    truth), which takes orjson (~10x faster than json here; it writes
    non-finite numbers as ``null``, keeping the file valid JSON).
    """
    if compact:
        try:
            return orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:  # e.g. integers beyond 64 bits: the stdlib writes them
            return (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode()
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def shard_uris(uri: str) -> list[str]:
    """URIs of the shard set's shards, in manifest (row) order."""
    return [storage.join(uri, entry["path"]) for entry in read_manifest(uri)["shards"]]


def read_shard(
    uri: str, entry: dict[str, Any] | None = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """A shard as a pyarrow Table; with its manifest ``entry``, checked against rows and sha256 first."""
    data = storage.read_bytes(uri)
    if entry is not None and sha256(data) != entry["sha256"]:
        raise ShardError(f"{uri}: sha256 differs from the manifest (corrupt or partial shard)")
    try:
        table = pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{uri}: not a readable parquet shard ({exc})") from exc
    if entry is not None and len(table) != int(entry["rows"]):
        raise ShardError(f"{uri}: {len(table)} rows, the manifest says {entry['rows']}")
    return table


def shard_is_complete(folder: str, entry: dict[str, Any]) -> bool:
    """True if the shard of a manifest ``entry`` exists with the recorded sha256 and row count."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return False
    try:
        data = storage.read_bytes(storage.join(folder, entry["path"]))
    except FileNotFoundError:
        return False
    if sha256(data) != entry.get("sha256"):
        return False
    try:
        return pq.read_metadata(pa.BufferReader(data)).num_rows == int(entry.get("rows", -1))
    except (pa.ArrowInvalid, OSError):
        return False
