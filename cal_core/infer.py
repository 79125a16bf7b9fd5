"""Batched inference: forward pass, flip test, decode, back-projection, instance scores.

Paper Alg. 2 (decode by Eq. 9 for udp/cal) with the flip test used for every
reported number: the outputs for an image and for its mirror are averaged
after mapping the mirror's outputs back (mirror along x, swap left/right
channels by :data:`~cal_core.skeleton.FLIP_INDEX`, negate the x offsets).
Under UDP geometry the heatmap's first and last pixel centres coincide with
the input's, so no one-pixel shift is needed (unlike the HRNet code).
Because the map-back is a linear involution, the averaged output of a mirrored
image is exactly the map-back of the averaged output of the image: the flip
test is mirror-equivariant for any network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cal_core.codecs import Codec
from cal_core.skeleton import FLIP_INDEX

#: Keypoints scoring above this count toward the instance score (HRNet's ``IN_VIS_THRE``).
KEYPOINT_SCORE_THRESHOLD = 0.2

Outputs = dict[str, torch.Tensor]


def flip_back(outputs: Outputs) -> Outputs:
    """Outputs for a mirrored input, mapped into the frame of the original input.

    Heatmaps ``(N, K, h, w)`` and offsets ``(N, K, 2, h, w)`` are mirrored along
    w and their joint channels relabelled (left <-> right); the x offset, which
    points the other way in the mirror, is negated.
    """
    index = torch.as_tensor(FLIP_INDEX, device=outputs["heatmap"].device)
    result = {"heatmap": outputs["heatmap"].flip(-1).index_select(1, index)}
    if "offset" in outputs:
        offset = outputs["offset"].flip(-1).index_select(1, index)
        result["offset"] = torch.stack([-offset[:, :, 0], offset[:, :, 1]], dim=2)
    return result


def forward(model: nn.Module, images: torch.Tensor, flip: bool = True) -> Outputs:
    """Network outputs for ``images`` ``(N, 3, H, W)``, averaged with the mirrored pass when ``flip``."""
    outputs = model(images)
    if not flip:
        return dict(outputs)
    mirrored = flip_back(model(images.flip(-1)))
    return {key: (outputs[key] + mirrored[key]) * 0.5 for key in mirrored}


def predict(
    model: nn.Module, images: torch.Tensor, codec: Codec, flip: bool = True, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints ``(N, K, 2)`` in input pixels and scores ``(N, K)`` for normalised ``images``.

    Runs in evaluation mode without gradients, ``batch_size`` images at a time,
    on the model's device (the model's training mode is restored afterwards).
    Results come back on the CPU.
    """
    if images.ndim != 4 or tuple(images.shape[2:]) != codec.input_size:
        raise ValueError(f"predict needs images (N, 3, {codec.input_size[0]}, {codec.input_size[1]}), "
                         f"got {tuple(images.shape)}")
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    keypoints, scores = [], []
    try:
        with torch.inference_mode():
            for chunk in images.split(batch_size) if len(images) else ():  # split() of 0 rows yields one empty chunk
                outputs = forward(model, chunk.to(device), flip)
                offset = outputs.get("offset") if codec.has_offsets else None
                kpts, score = codec.decode(outputs["heatmap"].float(), None if offset is None else offset.float())
                keypoints.append(kpts.cpu())
                scores.append(score.cpu())
    finally:
        model.train(was_training)
    if not keypoints:
        num_joints = len(FLIP_INDEX)
        return torch.zeros(0, num_joints, 2), torch.zeros(0, num_joints)
    return torch.cat(keypoints), torch.cat(scores)


def to_image_coords(keypoints: np.ndarray | torch.Tensor, input_to_image: np.ndarray) -> np.ndarray:
    """Map keypoints ``(N, K, 2)`` in input pixels to image pixels with per-instance ``(N, 2, 3)`` affines."""
    kpts = np.asarray(keypoints, dtype=np.float64)
    mats = np.asarray(input_to_image, dtype=np.float64)
    if kpts.ndim != 3 or kpts.shape[-1] != 2 or mats.shape != (kpts.shape[0], 2, 3):
        raise ValueError(f"need keypoints (N, K, 2) and affines (N, 2, 3), got {kpts.shape}, {mats.shape}")
    return np.einsum("nij,nkj->nki", mats[:, :, :2], kpts) + mats[:, None, :, 2]


def instance_score(
    box_scores: np.ndarray, keypoint_scores: np.ndarray, threshold: float = KEYPOINT_SCORE_THRESHOLD
) -> np.ndarray:
    """Person score = box score x mean of the keypoint scores above ``threshold`` (0 if none), as HRNet/mmpose."""
    kps = np.asarray(keypoint_scores, dtype=np.float64)
    confident = kps > threshold
    count = confident.sum(axis=-1)
    mean = np.where(count > 0, (kps * confident).sum(axis=-1) / np.maximum(count, 1), 0.0)
    return np.asarray(box_scores, dtype=np.float64) * mean
