"""Loading user-supplied weights and training checkpoints (local paths or ``s3://`` URIs).

Nothing is ever downloaded from the internet: ``weights`` is a state dict the
user already has. Every load uses ``torch.load(weights_only=True)``, so a file
from object storage cannot run code (DESIGN.md section 7).
"""

from __future__ import annotations

import logging
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Keys under which a saved dict may nest its state dict (ours, common trainers').
NESTED_KEYS = ("model", "state_dict")


def _is_remote(uri: str | Path) -> bool:
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def load_file(uri: str | Path) -> Any:
    """``torch.load(weights_only=True)`` of a local path, ``file://`` or ``s3://`` URI, on the CPU."""
    text = str(uri)
    if _is_remote(text):
        from cal_core import storage

        with tempfile.TemporaryDirectory(prefix="cal-pose-weights-") as tmp:
            local = storage.download(text, Path(tmp) / "weights.pt")  # streamed: no second copy in memory
            return _torch_load(local, text)
    path = Path(text.removeprefix("file://"))
    if not path.is_file():
        raise FileNotFoundError(f"no such weights/checkpoint file: {path}")
    return _torch_load(path, text)


def _torch_load(path: Path, uri: str) -> Any:
    """``torch.load(weights_only=True)``; a file torch cannot read is a ValueError naming ``uri``.

    torch's own error for, say, a JSON file passed as a checkpoint is a
    multi-line message that advises ``weights_only=False`` (unsafe for files
    from elsewhere, and no help for a file that is not a checkpoint): only
    the reason is kept (:func:`_load_reason`).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{uri} is not a torch checkpoint or weights file ({_load_reason(exc)})") from exc


def _load_reason(exc: BaseException) -> str:
    """The cause in a ``torch.load`` error: the weights-only unpickler's finding, else the first sentence."""
    text = str(exc).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        found = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
        return f"unreadable by the weights-only loader: {found}" if found else "unreadable by the weights-only loader"
    first = (text.splitlines() or [type(exc).__name__])[0]
    return first.split(". ")[0].rstrip(".")


def _state_dict(obj: Any, uri: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded object (bare, or nested under ``model``/``state_dict``)."""
    for key in NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{uri} does not hold a state dict of tensors")
    return obj


def load_weights(model: nn.Module, uri: str | Path) -> None:
    """Load a user's state dict into ``model`` (a :class:`~cal_core.models.heads.PoseNet`).

    Two kinds are accepted: a full cal-pose model state dict (keys such as
    ``shared.conv1.weight``; loaded strictly), or a backbone state dict such as
    an ImageNet HRNet/ResNet (keys such as ``conv1.weight``), mapped by
    submodule name onto ``shared``/``trunk``; keys the pose layout drops (the
    classifier, the last HRNet module's lower-resolution fuse layers) are
    ignored, and the heads (and the ``dual`` layout's ``offset_trunk``) keep
    their own init. Shape mismatches, or a dict that matches nothing, raise
    ``ValueError``.
    """
    state = _state_dict(load_file(uri), uri)
    own = model.state_dict()
    if set(state) <= set(own):
        wrong = [k for k, v in state.items() if own[k].shape != v.shape]
        if wrong:  # load_state_dict's own error is a multi-line RuntimeError
            raise ValueError(f"{uri}: a pose model whose tensors do not fit this one ({wrong[0]}: "
                             f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}; {len(wrong)} "
                             "differ): --weights takes a model of the same method, backbone and joints, or "
                             "backbone weights")
        model.load_state_dict(state, strict=True)
        return
    mapped = {}
    for part in ("shared", "trunk"):
        names = {name for name, _ in getattr(model, part).named_children()}
        mapped.update({f"{part}.{k}": v for k, v in state.items() if k.split(".")[0] in names})
    mapped = {k: v for k, v in mapped.items() if k in own}
    wrong = [k for k, v in mapped.items() if own[k].shape != v.shape]
    if not mapped or wrong:
        raise ValueError(f"{uri}: backbone keys that do not fit the model: {wrong[:5] or list(state)[:5]}")
    missing = [k for k in own if k.startswith(("shared.", "trunk.")) and k not in mapped]
    model.load_state_dict(mapped, strict=False)
    log.info("loaded %d backbone tensors from %s (%d backbone tensors left at init, %d keys ignored)",
             len(mapped), uri, len(missing), len(state) - len(mapped))
