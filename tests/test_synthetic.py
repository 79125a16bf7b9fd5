"""Synthetic COCO-format people: determinism, COCO validity, labels that match the drawing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from cal_core.cli import main as cli_main
from cal_core.data import synthetic
from cal_core.skeleton import NUM_KEYPOINTS

N_TRAIN, N_VAL = 60, 20


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, N_TRAIN, N_VAL, seed=3)
    return root


def _keypoints(ann: dict) -> np.ndarray:
    return np.asarray(ann["keypoints"], dtype=np.float64).reshape(NUM_KEYPOINTS, 3)


def test_same_seed_same_bytes_other_seed_differs(synth_root: Path, tmp_path: Path) -> None:
    synthetic.generate(tmp_path / "again", N_TRAIN, N_VAL, seed=3)
    synthetic.generate(tmp_path / "other", N_TRAIN, N_VAL, seed=4)
    first = _digest(synth_root)
    assert first == _digest(tmp_path / "again")
    other = _digest(tmp_path / "other")
    assert (
        other["annotations/person_keypoints_train2017.json"]
        != first["annotations/person_keypoints_train2017.json"]
    )


def test_coco_layout_counts_people_and_loads_in_pycocotools(synth_root: Path) -> None:
    for folder, n_people in (("train2017", N_TRAIN), ("val2017", N_VAL)):
        coco = COCO(str(synth_root / "annotations" / f"person_keypoints_{folder}.json"))
        assert len(coco.getAnnIds()) == n_people
        assert coco.loadCats(coco.getCatIds())[0]["name"] == "person"
        files = sorted(p.name for p in (synth_root / folder).iterdir())
        assert files == sorted(img["file_name"] for img in coco.dataset["images"])
        for img in coco.dataset["images"][:10]:
            pixels = cv2.imread(str(synth_root / folder / img["file_name"]))
            assert pixels.shape == (img["height"], img["width"], 3)
    train = json.loads((synth_root / "annotations/person_keypoints_train2017.json").read_text())
    val = json.loads((synth_root / "annotations/person_keypoints_val2017.json").read_text())
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    assert not {a["id"] for a in train["annotations"]} & {a["id"] for a in val["annotations"]}


def test_keypoints_inside_image_and_box_counts_and_area(synth_root: Path) -> None:
    data = json.loads((synth_root / "annotations/person_keypoints_train2017.json").read_text())
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    for ann in data["annotations"]:
        width, height = sizes[ann["image_id"]]
        kp = _keypoints(ann)
        labelled = kp[:, 2] > 0
        assert set(np.unique(kp[:, 2])) <= {0, 1, 2}
        assert ann["num_keypoints"] == labelled.sum()
        assert (kp[~labelled, :2] == 0).all()
        assert (kp[labelled, 0] >= 0).all() and (kp[labelled, 0] <= width - 1).all()
        assert (kp[labelled, 1] >= 0).all() and (kp[labelled, 1] <= height - 1).all()
        x, y, w, h = ann["bbox"]
        assert (
            w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width - 1 + 1e-6 and y + h <= height - 1 + 1e-6
        )
        inside = (kp[labelled, 0] >= x - 1e-6) & (kp[labelled, 0] <= x + w + 1e-6)
        inside &= (kp[labelled, 1] >= y - 1e-6) & (kp[labelled, 1] <= y + h + 1e-6)
        assert inside.all(), f"ann {ann['id']}: labelled keypoints outside its bbox"
        assert 1.0 <= ann["area"] <= (w + 1) * (h + 1)
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1


def test_occluded_and_unlabelled_joints_and_scale_range_occur(synth_root: Path) -> None:
    data = json.loads((synth_root / "annotations/person_keypoints_train2017.json").read_text())
    vis = np.stack([_keypoints(a)[:, 2] for a in data["annotations"]])
    assert (vis == 1).sum() >= 20, "occluded joints (v=1) should be common"
    assert (vis == 0).sum() >= 20, "unlabelled joints (v=0: off-image, behind the head) should occur"
    heights = np.array([a["bbox"][3] for a in data["annotations"]])
    assert heights.min() < 80 and heights.max() > 200


def test_figure_is_drawn_where_the_visible_keypoints_are() -> None:
    """A visible joint's pixels change when the people are drawn over the same background."""
    tiles = synthetic.noise_tiles(0)
    changed, total = 0, 0
    for seed in range(12):
        with_people, anns = synthetic.render_scene(np.random.default_rng(seed), 3, tiles)
        empty, none = synthetic.render_scene(np.random.default_rng(seed), 0, tiles)
        assert none == [] and empty.shape == with_people.shape
        diff = np.abs(with_people.astype(np.int16) - empty.astype(np.int16)).max(axis=2)
        for ann in anns:
            for x, y, v in _keypoints(ann):
                if v == 2:
                    total += 1
                    changed += diff[int(round(y)), int(round(x))] > 8
    assert total > 100
    assert changed / total > 0.97


def test_left_eye_appears_on_the_viewers_right_when_the_face_shows() -> None:
    """COCO sides are the person's own: facing the camera, the left eye is on the image right."""
    rng = np.random.default_rng(0)
    signs = []
    for _ in range(400):
        fig = synthetic.sample_figure(rng, 200.0, np.array([300.0, 300.0]))
        if fig.face_front[0] > 0.5 * fig.radius:  # nose well toward the camera
            up = fig.head - fig.keypoints[[5, 6]].mean(0)
            across = fig.keypoints[1] - fig.keypoints[2]  # right eye -> left eye
            signs.append(np.sign(up[0] * across[1] - up[1] * across[0]))
    assert len(signs) > 100
    assert np.mean(np.array(signs) > 0) > 0.97


def test_cli_synth_writes_the_tree(tmp_path: Path) -> None:
    assert cli_main(["synth", "--out", str(tmp_path), "--train", "5", "--val", "3", "--seed", "1"]) == 0
    val = json.loads((tmp_path / "annotations/person_keypoints_val2017.json").read_text())
    assert len(val["annotations"]) == 3


def test_negative_counts_and_bad_quality_are_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="people counts"):
        synthetic.generate(tmp_path, -1, 2)
    with pytest.raises(ValueError, match="JPEG quality must be 1..100, got 500"):
        synthetic.generate(tmp_path, 1, 1, quality=500)
    with pytest.raises(ValueError, match="--seed must be >= 0"):  # numpy said "expected non-negative integer"
        synthetic.generate(tmp_path, 1, 1, seed=-1)
    for flags in (["--train", "-1", "--val", "1"], ["--train", "1", "--val", "1", "--quality", "500"]):
        with pytest.raises(SystemExit) as stopped:  # a usage error, not a traceback
            cli_main(["synth", "--out", str(tmp_path / "cli"), *flags])
        assert stopped.value.code == 2 and "is outside" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_plain_style_has_one_person_per_scene_on_an_uncluttered_background(tmp_path: Path) -> None:
    assert cli_main(["synth", "--out", str(tmp_path), "--train", "12", "--val", "0", "--seed", "2",
                     "--style", "plain"]) == 0
    train = json.loads((tmp_path / "annotations/person_keypoints_train2017.json").read_text())
    assert train["info"]["style"] == "plain"
    assert len(train["images"]) == len(train["annotations"]) == 12
    # no clutter shapes: the sharpest background edges (99.5th percentile of the gradient) stay soft
    tiles = synthetic.noise_tiles(0)

    def sharpest_edges(style: str) -> np.ndarray:
        found = []
        for seed in range(6):
            image, _ = synthetic.render_scene(np.random.default_rng(seed), 0, tiles, synthetic.STYLES[style])
            grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.5)
            found.append(np.percentile(np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)),
                                       99.5))
        return np.asarray(found)

    plain, full = sharpest_edges("plain"), sharpest_edges("full")  # measured: plain 19-85, full 101-188
    assert plain.max() < full.min()
    with pytest.raises(ValueError, match="scene style"):
        synthetic.generate(tmp_path / "bad", 1, 0, style="busy")
