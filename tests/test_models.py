"""cal_core.models: output shapes at every input size, Table 1 parameter counts, weights, checkpoints."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from cal_core import storage
from cal_core.models import (
    BACKBONES,
    HEADS,
    build_model,
    count_parameters,
    default_head,
    load_checkpoint,
    model_from_checkpoint,
)
from tests.s3server import s3_server  # noqa: F401  (pytest fixture)

SIZES = [(64, 48), (128, 96), (256, 192)]


def _forward(model: torch.nn.Module, size: tuple[int, int], batch: int = 1) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, *size))


def _assert_outputs(out: dict[str, torch.Tensor], head: str, size: tuple[int, int], batch: int,
                    joints: int = 17) -> None:
    h, w = size[0] // 4, size[1] // 4
    assert out["heatmap"].shape == (batch, joints, h, w)
    if head == "heatmap":
        assert set(out) == {"heatmap"}
    else:
        assert set(out) == {"heatmap", "offset"}
        assert out["offset"].shape == (batch, joints, 2, h, w)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backbone", ["tiny", "hrnet_w18_small", "resnet50"])
def test_output_is_input_over_4_at_every_size(backbone: str, head: str) -> None:
    model = build_model(backbone, head)
    for size in SIZES:
        _assert_outputs(_forward(model, size), head, size, batch=1)


@pytest.mark.parametrize("backbone", ["hrnet_w32", "hrnet_w48"])
def test_large_hrnets_work_at_every_size(backbone: str) -> None:
    """One batch-1 forward per size (timm's own HRNet fails at 64x48); the heads are tested above."""
    model = build_model(backbone, "heatmap")
    for size in SIZES:
        _assert_outputs(_forward(model, size), "heatmap", size, batch=1)


def test_num_joints_is_configurable() -> None:
    out = _forward(build_model("tiny", "offset", num_joints=5), (64, 48), batch=3)
    _assert_outputs(out, "offset", (64, 48), 3, 5)


@pytest.mark.parametrize(("backbone", "head", "millions", "gflops"), [
    ("hrnet_w32", "heatmap", 28.5, 1.8),   # Table 1: HRNet
    ("hrnet_w32", "offset", 28.6, 1.8),    # Table 1: UDP
    ("hrnet_w32", "dual", 49.3, 2.5),      # Table 1: CAL
    ("hrnet_w48", "heatmap", 63.6, 3.7),   # Table 1: HRNet
    ("hrnet_w48", "offset", 63.7, 3.7),    # Table 1: UDP
    ("hrnet_w48", "dual", 110.3, 5.3),     # Table 1: CAL
    ("resnet50", "heatmap", 34.0, None),   # SimpleBaseline-R50 (Xiao et al.)
])
def test_params_and_gflops_match_the_paper(backbone: str, head: str, millions: float,
                                           gflops: float | None) -> None:
    """#Params and GFLOPs at 128x96 within 3% of Table 1.

    Table 1's GFLOPs are conv multiply-adds / 1024**3 (the authors'
    get_model_summary). Built on the meta device: shapes only, no arithmetic.
    """
    with torch.device("meta"):
        model = build_model(backbone, head).eval()
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.03)
    if gflops is not None:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, 3, 128, 96, device="meta"))
        assert counter.get_total_flops() / 2 / 2**30 == pytest.approx(gflops, rel=0.03)


def test_tiny_net_is_small() -> None:
    assert count_parameters(build_model("tiny", "dual")) < 1_000_000


@pytest.mark.parametrize(("backbone", "head"),
                         [("tiny", head) for head in HEADS] + [("hrnet_w18_small", "dual"), ("resnet50", "dual")])
def test_every_parameter_gets_a_gradient(backbone: str, head: str) -> None:
    """No dead weights (e.g. timm's unused fuse layers): DDP needs no find_unused_parameters."""
    model = build_model(backbone, head, input_size=(64, 48)).train()
    sum(out.sum() for out in model(torch.randn(2, 3, 64, 48)).values()).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_dual_branches_are_separate() -> None:
    """The offset loss reaches the second trunk only; the heatmap loss never touches it."""
    model = build_model("tiny", "dual")
    model(torch.randn(2, 3, 64, 48))["heatmap"].sum().backward()
    assert all(p.grad is None for p in model.offset_trunk.parameters())
    assert all(p.grad is not None for p in model.trunk.parameters())
    assert not torch.equal(model.trunk[0].conv1.weight, model.offset_trunk[0].conv1.weight)


def test_hrnet_matches_timm_where_timm_works(tmp_path) -> None:
    """At 128x96 (multiple of 32) the size-aware fuse equals timm's fixed x2^k upsampling.

    Also loads a timm (ImageNet-layout) state dict through ``weights``, the
    path a user's pretrained HRNet takes.
    """
    torch.manual_seed(0)
    reference = timm.create_model("hrnet_w18_small_v2", pretrained=False, features_only=True,
                                  feature_location="", out_indices=(1,)).eval()
    torch.save(reference.state_dict(), tmp_path / "imagenet.pt")
    model = build_model("hrnet_w18_small", "heatmap", weights=tmp_path / "imagenet.pt").eval()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        expected = reference(x)[0]
        got = model.trunk(model.shared(x))
    # Same maths, different summation order: float32 agreement relative to the output scale.
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_full_state_dict_weights_reproduce_the_model(tmp_path) -> None:
    source = build_model("tiny", "dual").eval()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build_model("tiny", "dual", weights=str(tmp_path / "w.pt")).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        for key, value in source(x).items():
            torch.testing.assert_close(loaded(x)[key], value)


def test_bad_weights_are_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        build_model("tiny", "heatmap", weights=tmp_path / "missing.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="fit"):
        build_model("tiny", "heatmap", weights=tmp_path / "foreign.pt")
    wrong = build_model("tiny", "heatmap", num_joints=5).state_dict()
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong.pt: a pose model whose tensors do not fit this one"):
        build_model("tiny", "heatmap", weights=tmp_path / "wrong.pt")
    torch.save(build_model("tiny", "heatmap").state_dict(), tmp_path / "heatmap.pt")  # once a RuntimeError
    with pytest.raises(ValueError, match="same method, backbone and joints"):
        build_model("tiny", "offset", weights=tmp_path / "heatmap.pt")


def test_checkpoint_round_trip(tmp_path) -> None:
    model = build_model("tiny", "offset", input_size=(64, 48)).eval()
    config = {"method": "udp", "backbone": "tiny", "input_size": "64x48", "num_joints": 17, "stage": 1}
    torch.save({"model": model.state_dict(), "config": config, "epoch": 3}, tmp_path / "model.pt")
    ckpt = load_checkpoint(f"file://{tmp_path / 'model.pt'}")
    rebuilt = model_from_checkpoint(ckpt).eval()
    assert rebuilt.arch == {"backbone": "tiny", "head": "offset", "num_joints": 17, "input_size": (64, 48)}
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["offset"], model(x)["offset"])


def test_checkpoint_and_weights_from_s3(s3_server, tmp_path) -> None:  # noqa: F811
    model = build_model("tiny", "dual", input_size=(64, 48)).eval()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": {"method": "cal", "backbone": "tiny",
                                                         "input_size": [64, 48]}}, buffer)
    uri = f"s3://{s3_server.bucket}/runs/model.pt"
    storage.write_bytes(uri, buffer.getvalue())
    rebuilt = model_from_checkpoint(load_checkpoint(uri)).eval()
    from_weights = build_model("tiny", "dual", input_size=(64, 48), weights=uri).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["offset"], model(x)["offset"])
        torch.testing.assert_close(from_weights(x)["heatmap"], model(x)["heatmap"])


def test_not_a_checkpoint_is_refused(tmp_path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="config"):
        model_from_checkpoint({"model": {}, "config": {"backbone": "tiny"}})
    for name, content in (("a.json", b'{"images": []}'), ("half.pt", (tmp_path / "x.pt").read_bytes()[:100])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a torch checkpoint or weights file") as info:
            load_checkpoint(tmp_path / name)
        # torch's advice to unpickle untrusted files ("`weights_only` set to `False` will likely succeed") is dropped
        assert "weights_only" not in str(info.value) and "likely succeed" not in str(info.value)
        assert name != "a.json" or "weights-only loader: Unsupported operand 123" in str(info.value)


def test_default_heads_and_bad_arguments() -> None:
    assert [default_head(m) for m in ("heatmap", "dark", "udp", "cal")] == ["heatmap", "heatmap", "offset", "dual"]
    with pytest.raises(ValueError, match="method"):
        default_head("simcc")
    with pytest.raises(ValueError, match="backbone"):
        build_model("vit", "heatmap")
    with pytest.raises(ValueError, match="head"):
        build_model("tiny", "triple")
    with pytest.raises(ValueError, match="multiples of 4"):
        build_model("tiny", "heatmap", input_size=(66, 48))
    assert set(BACKBONES) == {"tiny", "hrnet_w18_small", "hrnet_w32", "hrnet_w48", "resnet50"}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["hrnet_w18_small", "resnet50"])
def test_onnx_export_at_64x48_matches_torch(tmp_path, backbone: str) -> None:
    """The size-aware fuse (HRNet) and the deconv crops (ResNet) export with a dynamic batch."""
    ort = pytest.importorskip("onnxruntime")
    model = build_model(backbone, "dual", input_size=(64, 48)).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 64, 48),), str(path), dynamo=True, external_data=False,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 64, 48)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    for value, reference in zip(got, expected.values(), strict=True):
        assert value.shape == tuple(reference.shape)
        assert abs(value - reference.numpy()).max() <= 1e-4 * max(1.0, float(reference.abs().max()))
