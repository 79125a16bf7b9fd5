"""Training loop: every method learns, stage 2 starts from stage 1, exact resume, guards, tracking outages."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cal_core import checkpoint, storage
from cal_core.config import TrainConfig
from cal_core.distributed import DistContext
from cal_core.models import build_model
from cal_core.stage2 import offset_only_parameters
from cal_core.train import NonFiniteLossError, build_session, train, train_step
from tests.s3server import s3_server  # noqa: F401 - pytest fixture
from tests.train_fixtures import build_tiny_shards

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """~40 synthetic people at 64x48, train and val shards (built once per session)."""
    return build_tiny_shards(tmp_path_factory)


@pytest.fixture(autouse=True)
def _quiet_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No MLflow server (the tracker records to the run folder's offline file, or ./runs/offline for an
    s3:// run folder: the test's temp folder, never the checkout); one torch thread, so a busy shared
    CPU does not make multi-threaded kernels spin."""
    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(shards: dict[str, str], out: Path, **kw) -> TrainConfig:
    base = {"shards": shards["train"], "out": str(out), "method": "cal", "epochs": 1, "batch_size": 8,
            "workers": 0, "val_every": 0, "progress": False, "seed": 0, "lr_steps": (), "threads": 1}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def stage1(tiny_shards: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A 1-epoch CAL stage-1 model and its gmm.json (fit-gmm, 1 component)."""
    from cal_core.fit_gmm import fit_gmm

    root = tmp_path_factory.mktemp("stage1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAL_POSE_TRACKING", "off")
        s1 = train(_config(tiny_shards, root / "s1"))
        fit_gmm(s1, tiny_shards["train"], str(root / "gmm"), components=1)
    torch.set_num_threads(threads)
    return s1, str(root / "gmm" / "gmm.json")


@pytest.mark.parametrize(("method", "stage"), [("heatmap", 1), ("dark", 1), ("udp", 1), ("cal", 1), ("cal", 2)])
def test_loss_decreases_on_a_fixed_batch(method: str, stage: int, tiny_shards, stage1, tmp_path: Path) -> None:
    extra = {}
    if stage == 2:
        s1, gmm = stage1
        extra = {"init": s1, "gmm": gmm, "lr": 1e-3}
    torch.manual_seed(0)
    session = build_session(_config(tiny_shards, tmp_path / "run", method=method, stage=stage, **extra), CPU)
    batch = next(iter(torch.utils.data.DataLoader(session.dataset, batch_size=8)))
    session.model.train()
    losses = [float(train_step(session, batch)[0]) for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses


def test_fit_gmm_writes_the_mixture_statistics_and_plots(stage1) -> None:
    _, gmm = stage1
    folder = Path(gmm).parent
    report = json.loads(Path(gmm).read_text())
    assert report["n_components"] == 1 and report["selection"] == "fixed"
    assert report["stats"]["count"] > 100 and report["radius"] > 0 and set(report["bic"]) == {"1", "2", "3"}
    assert all((folder / name).stat().st_size > 1000 for name in ("displacements.png", "mask.png"))
    assert (folder / "mlflow-offline.jsonl").is_file()


def test_amp_is_for_gpus_and_its_bf16_path_trains(tiny_shards, tmp_path: Path) -> None:
    """--amp on the CPU is ignored (bf16 autocast there is ~10x slower); the bf16 step itself works."""
    from cal_core.train import amp_dtype_for

    assert amp_dtype_for(torch.device("cpu"), amp=False) is None
    assert amp_dtype_for(torch.device("cpu"), amp=True) is None
    session = build_session(_config(tiny_shards, tmp_path, method="udp", amp=True), CPU)
    assert session.amp_dtype is None and not session.scaler.is_enabled()
    session.amp_dtype = torch.bfloat16  # what a GPU with bf16 runs
    batch = next(iter(torch.utils.data.DataLoader(session.dataset, batch_size=8)))
    losses = [float(train_step(session, batch)[0]) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_a_non_finite_gradient_stops_before_the_update(tiny_shards, tmp_path: Path) -> None:
    """A finite loss with an inf gradient once reached Adam, which wrote NaN into the weights (and last.pt)."""
    from cal_core.train import NonFiniteLossError

    session = build_session(_config(tiny_shards, tmp_path, method="udp"), CPU)
    weight = next(session.model.parameters())
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * float("inf"))
    batch = next(iter(torch.utils.data.DataLoader(session.dataset, batch_size=8)))
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient .* stopped without updating the weights"):
        train_step(session, batch)
    assert torch.equal(weight.detach(), before)


def test_a_checkpoint_without_fp16_state_resumes_under_fp16(tiny_shards, tmp_path: Path) -> None:
    """last.pt written without amp (or with bf16) holds an empty scaler state, which an fp16 scaler refused."""
    from cal_core.train import _restore, _save_last

    session = build_session(_config(tiny_shards, tmp_path), CPU)
    _save_last(session)
    resumed = build_session(_config(tiny_shards, tmp_path), CPU)
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True)  # a retried pod on a GPU without bf16
    _restore(resumed, checkpoint.latest(str(tmp_path)))
    assert resumed.scaler.is_enabled()


def test_stage2_settings_in_stage1_and_alpha_without_offsets_are_refused(tiny_shards, tmp_path: Path) -> None:
    for settings, message in (({"gmm": "gmm.json"}, "--gmm is for stage 2"),
                              ({"mgm_update": "batch"}, "--mgm-update is for stage 2"),
                              ({"stage2_train": "offset"}, "--stage2-train is for stage 2"),
                              ({"method": "heatmap", "alpha": 5.0}, "method 'heatmap' has no offsets")):
        with pytest.raises(ValueError, match=message):
            _config(tiny_shards, tmp_path, **settings)


def test_stage2_starts_from_stage1_and_records_its_masks(tiny_shards, stage1, tmp_path: Path) -> None:
    s1, gmm = stage1
    first = checkpoint.load(s1)
    session = build_session(_config(tiny_shards, tmp_path / "s2", stage=2, init=s1, gmm=gmm), CPU)
    for name, tensor in session.model.state_dict().items():
        assert torch.equal(tensor, first["model"][name]), name
    s2 = checkpoint.load(train(_config(tiny_shards, tmp_path / "s2", stage=2, init=s1, gmm=gmm,
                                       mgm_update="batch", epochs=1)))
    assert s2["config"]["stage"] == 2 and s2["config"]["train"]["init"] == s1
    assert s2["mgm"]["n_components"] == 1
    assert any(not torch.equal(s2["model"][k], first["model"][k]) for k in first["model"])


def test_stage2_resumes_with_its_inputs_spelled_another_way(tiny_shards, stage1, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--init/--gmm were compared as strings: the same file by a relative path or a symlink was refused."""
    s1, gmm = stage1
    settings = {"stage": 2, "epochs": 1, "max_steps": 1}
    train(_config(tiny_shards, tmp_path / "s2", init=s1, gmm=gmm, **settings))
    (tmp_path / "link.pt").symlink_to(s1)
    monkeypatch.chdir(Path(gmm).parent)
    train(_config(tiny_shards, tmp_path / "s2", init=str(tmp_path / "link.pt"), gmm=Path(gmm).name, resume=True,
                  **settings))
    shutil.copyfile(gmm, tmp_path / "copy.json")  # another file (it may change apart from the first): refused
    with pytest.raises(ValueError, match=r"trained with gmm=.*, this run asks for .*copy.json"):
        train(_config(tiny_shards, tmp_path / "s2", init=s1, gmm=str(tmp_path / "copy.json"), resume=True,
                      **settings))


def test_stage2_refuses_an_init_of_another_method(tiny_shards, stage1, tmp_path: Path) -> None:
    """A udp checkpoint as --init once failed inside load_state_dict with a size-mismatch dump."""
    s1, gmm = stage1
    state = checkpoint.load(s1)
    state["config"] = {**state["config"], "method": "udp"}
    torch.save(state, tmp_path / "udp.pt")
    with pytest.raises(ValueError, match="is a udp method checkpoint, this run trains cal"):
        build_session(_config(tiny_shards, tmp_path / "s2", stage=2, init=str(tmp_path / "udp.pt"), gmm=gmm), CPU)


def test_stage2_offset_mode_keeps_the_heatmap_path_fixed(tiny_shards, stage1, tmp_path: Path) -> None:
    s1, gmm = stage1
    s2 = checkpoint.load(train(_config(tiny_shards, tmp_path / "s2", stage=2, init=s1, gmm=gmm,
                                       stage2_train="offset")))
    first = checkpoint.load(s1)["model"]
    changed = {k for k in first if not torch.equal(s2["model"][k], first[k])}
    model = build_model("tiny", "dual", input_size=(64, 48))
    offset_modules = {name.rsplit(".", 1)[0] for name in offset_only_parameters(model, (64, 48))}
    assert changed and offset_modules
    assert {k.rsplit(".", 1)[0] for k in changed} <= offset_modules, sorted(changed)


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, stop_step: int) -> None:
    """Make the run die (as if killed) when it reaches global step ``stop_step``."""
    import cal_core.train as train_module

    real = train_module.train_step

    def dying(session, batch):
        if session.step + 1 == stop_step:
            raise KeyboardInterrupt("simulated kill")
        return real(session, batch)

    monkeypatch.setattr(train_module, "train_step", dying)


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_killed_and_resumed_equals_uninterrupted(checkpoint_every: int, tiny_shards, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"epochs": 2, "deterministic": True, "checkpoint_every": checkpoint_every, "lr_steps": (1,)}
    reference = checkpoint.load(train(_config(tiny_shards, tmp_path / "ref", **settings)))
    per_epoch = reference["step"] // 2
    with monkeypatch.context() as patch:
        _interrupt_at(patch, per_epoch + 4)
        with pytest.raises(KeyboardInterrupt):
            train(_config(tiny_shards, tmp_path / "cut", **settings))
    stopped = checkpoint.load(str(tmp_path / "cut" / checkpoint.LAST))
    assert stopped["epoch"] == 1
    if checkpoint_every:  # the last step checkpoint lies inside epoch 2: resume mid-epoch
        assert 0 < stopped["epoch_step"] == stopped["step"] - per_epoch
    else:
        assert stopped["epoch_step"] == 0 and stopped["step"] == per_epoch
    resumed = checkpoint.load(train(_config(tiny_shards, tmp_path / "cut", resume=True, **settings)))
    assert resumed["step"] == reference["step"]
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny_shards, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import cal_core.train as train_module

    real = train_module.build_session

    def poisoned(config, ctx):
        session = real(config, ctx)
        loss_fn = session.loss_fn

        def loss(outputs, targets, weights, mgm=None):
            total, terms = loss_fn(outputs, targets, weights, mgm)
            return (total * float("nan"), terms) if session.step == 3 else (total, terms)

        session.loss_fn = loss
        return session

    monkeypatch.setattr(train_module, "build_session", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 4") as info:
        train(_config(tiny_shards, tmp_path, checkpoint_every=2))
    assert str(tmp_path / checkpoint.LAST) in str(info.value)
    assert checkpoint.load(str(tmp_path / checkpoint.LAST))["step"] == 2


def _val_points(out: Path) -> list[dict]:
    """The metric dicts with ``val_AP`` that a run into ``out`` logged (its offline tracking file)."""
    events = [json.loads(line) for line in (out / "mlflow-offline.jsonl").read_text().splitlines()]
    return [e["data"]["values"] for e in events if e["kind"] == "metrics" and "val_AP" in e["data"]["values"]]


def test_validation_logs_coco_ap_every_epoch(tiny_shards, tmp_path: Path) -> None:
    train(_config(tiny_shards, tmp_path, method="heatmap", val_shards=tiny_shards["val"], val_every=1, epochs=2))
    logged = _val_points(tmp_path)
    assert len(logged) == 2
    assert all(0.0 <= m["val_AP"] <= 1.0 and m["samples_seen"] == 40 for m in logged)
    assert [m["lr"] for m in logged] == [1e-3, 1e-3]  # per epoch: 5 steps never reach --log-every


@pytest.mark.timeout(120)
def test_loader_workers_forked_after_validation_do_not_hang(tiny_shards, tmp_path: Path) -> None:
    """Validation runs cv2 in this process; the next epoch's forked workers must still decode crops."""
    model = train(_config(tiny_shards, tmp_path, method="udp", workers=1, val_shards=tiny_shards["val"],
                          val_every=1, epochs=2))
    assert checkpoint.load(model)["epoch"] == 2


def test_checkpoints_go_to_s3_and_a_run_resumes_from_there(tiny_shards, s3_server) -> None:  # noqa: F811
    out = f"s3://{s3_server.bucket}/runs/udp"
    train(_config(tiny_shards, out, method="udp", epochs=2, max_steps=3))
    assert checkpoint.load(f"{out}/{checkpoint.LAST}")["step"] == 3
    final = checkpoint.load(train(_config(tiny_shards, out, method="udp", epochs=2, resume=True)))
    assert final["step"] == 10 and final["epoch"] == 2


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_mlflow_does_not_stop_training(tiny_shards, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAL_POSE_TRACKING")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    model = train(_config(tiny_shards, tmp_path, method="udp", max_steps=2))
    assert Path(model).is_file()
    offline = (tmp_path / "mlflow-offline.jsonl").read_text()
    assert '"kind": "params"' in offline and "train_manifest_sha256" in offline


def test_an_out_that_holds_a_training_or_cannot_be_written_is_refused_before_training(tiny_shards,
                                                                                      tmp_path: Path) -> None:
    """A rerun without --resume once replaced a finished model after an epoch; an unwritable out failed at its save."""
    from cal_core.train import SetupError

    model = Path(train(_config(tiny_shards, tmp_path / "run", method="udp", max_steps=1)))
    before = model.read_bytes()
    with pytest.raises(SetupError, match=r"already holds a training \(last.pt, model.pt\): --resume continues it"):
        train(_config(tiny_shards, tmp_path / "run", method="udp", max_steps=1, seed=1))
    assert model.read_bytes() == before
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SetupError, match="--out: cannot write to .*a-file"):
        train(_config(tiny_shards, tmp_path / "a-file", method="udp", max_steps=1))
    with storage.exclusive(tmp_path / "busy", "training"), \
            pytest.raises(storage.FolderInUseError, match="busy is in use by another running training"):
        train(_config(tiny_shards, tmp_path / "busy", method="udp", max_steps=1))  # the same command twice at once
    assert not (tmp_path / "busy").exists()


def test_shards_without_keypoint_labels_are_refused_and_a_val_split_warned_about(
        tiny_shards, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Detection-box shards once trained at loss 0 for every epoch and wrote random weights, exit 0."""
    import json

    from cal_core.train import SetupError

    shutil.copytree(tiny_shards["val"], tmp_path / "det")
    manifest = json.loads((tmp_path / "det" / "manifest.json").read_text())
    manifest["settings"]["box_source"] = "detections"
    (tmp_path / "det" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SetupError, match="det was cut from detector boxes, which carry no keypoint labels"):
        train(_config({"train": str(tmp_path / "det")}, tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run").exists()
    with caplog.at_level("WARNING", logger="cal_core.train"):
        train(_config({"train": tiny_shards["val"]}, tmp_path / "val-run", max_steps=1))
    assert "is a val split: people without a labelled keypoint are kept there" in caplog.text


def test_ctrl_c_stops_at_the_next_step_and_a_second_one_at_once(tiny_shards, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt raised while the DataLoader forked was swallowed by an at-fork callback."""
    import os
    import signal

    import cal_core.train as train_module

    real, steps = train_module.train_step, []

    def step_then_ctrl_c(s, batch):
        steps.append(s.step)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled here: a flag, no exception inside the step
        return real(s, batch)

    monkeypatch.setattr(train_module, "train_step", step_then_ctrl_c)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as an interactive shell starts us
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_config(tiny_shards, tmp_path / "run", method="udp", epochs=3))
        assert steps == [0, 1]  # the step that got the signal finished; the next one never started
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
        # started with SIGINT ignored (a script's background job, where `make test` once ran): it stays ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        steps.clear()
        train(_config(tiny_shards, tmp_path / "ignored", method="udp", epochs=1, max_steps=3))
        assert steps == [0, 1, 2] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert not train_module._STOP_REQUESTED.is_set()
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with train_module._ctrl_c_between_steps():
            os.kill(os.getpid(), signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs at the next bytecode boundary
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_checkpoint_round_trips_rng_states_and_loads_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = checkpoint.rng_state()
    before = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.save(str(tmp_path / "c.pt"), {"rng": state, "model": torch.nn.Linear(2, 2).state_dict()})
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    checkpoint.set_rng_state(raw["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == before
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt is not a torch checkpoint or weights file"):
        checkpoint.load(str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError):
        checkpoint.load(str(tmp_path / "missing.pt"))


def test_cpu_threads_leave_the_loader_workers_their_cores() -> None:
    import os

    from cal_core.train import cpu_threads

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(3, 2) == 3
    assert cpu_threads(0, 0) == cores
    assert cpu_threads(0, cores + 4) == 1


def test_bad_settings_are_rejected(tmp_path: Path) -> None:
    shards = {"train": str(tmp_path)}
    with pytest.raises(ValueError, match="needs --init"):
        _config(shards, tmp_path, stage=2)
    with pytest.raises(ValueError, match="only for method 'cal'"):
        _config(shards, tmp_path, method="udp", stage=2, init="x", gmm="y")
    for steps in ((5, 2), (1, 1)):  # a repeated epoch once passed: MultiStepLR then drops twice there
        with pytest.raises(ValueError, match="lr_steps must increase"):
            _config(shards, tmp_path, lr_steps=steps)
    with pytest.raises(ValueError, match=r"lr_steps \[170, 200\] must lie inside the 50 epochs"):
        _config(shards, tmp_path, epochs=50, lr_steps=(170, 200))
    for lr in (float("inf"), float("nan"), 0.0):  # inf once trained a step, then NonFiniteLossError (traceback)
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            _config(shards, tmp_path, lr=lr)
    with pytest.raises(ValueError, match="max_steps must be >= 0"):
        _config(shards, tmp_path, max_steps=-5)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        _config(shards, tmp_path, threads=-3)


def test_default_lr_steps_scale_the_paper_schedule_to_the_epochs(tmp_path: Path) -> None:
    """A UI run with epochs_stage1=50 must still decay (once it silently kept 170,200 and never did)."""
    from cal_core.config import TrainConfig, paper_lr_steps, parse_steps

    assert paper_lr_steps(210) == (170, 200)  # the paper, §5.2
    assert paper_lr_steps(50) == (40, 48)  # 50 * 170 / 210 = 40.5, 50 * 200 / 210 = 47.6
    assert paper_lr_steps(5) == (4,) and paper_lr_steps(2) == ()
    assert parse_steps("auto") is None and parse_steps("") == () and parse_steps("3, 7") == (3, 7)
    assert TrainConfig(shards="s", out="o", epochs=50).lr_steps == (40, 48)
    assert TrainConfig(shards="s", out="o", epochs=50, lr_steps=parse_steps("auto")).lr_steps == (40, 48)
    assert TrainConfig(shards="s", out="o", stage=2, init="i", gmm="g").lr_steps == ()


def test_cpu_threads_share_the_cores_between_torchrun_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from cal_core.train import cpu_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(0, 0) == max(1, cores // 2)
    assert cpu_threads(3, 0) == 3


def test_resume_refuses_another_seed_or_other_shards(tiny_shards, tmp_path: Path) -> None:
    """The epoch's batches come from the seed and the shards: resuming with others would mix two runs."""
    import json
    import shutil

    out = tmp_path / "run"
    train(_config(tiny_shards, out, epochs=2, max_steps=2, checkpoint_every=1))
    assert checkpoint.load(str(out / checkpoint.LAST))["epoch_step"] == 2
    with pytest.raises(ValueError, match="trained with seed=0, this run asks for 1"):
        train(_config(tiny_shards, out, epochs=2, resume=True, seed=1))
    # the optimiser and schedule come back from last.pt: a new lr would be ignored while model.pt recorded it
    with pytest.raises(ValueError, match=r"trained with lr=0.001, this run asks for 1e-05 .*--weights .*last.pt"):
        train(_config(tiny_shards, out, epochs=2, resume=True, lr=1e-5))
    with pytest.raises(ValueError, match=r"trained with lr_steps=\[\], this run asks for \[1\]"):
        train(_config(tiny_shards, out, epochs=2, resume=True, lr_steps=(1,)))
    # the objective too: a new alpha or augmentation midway would be recorded as if it had held throughout
    with pytest.raises(ValueError, match=r"trained with alpha=1.4, this run asks for 50.0"):
        train(_config(tiny_shards, out, epochs=2, resume=True, alpha=50.0))
    with pytest.raises(ValueError, match=r"trained with augment=True, this run asks for False"):
        train(_config(tiny_shards, out, epochs=2, resume=True, augment=False))
    other = tmp_path / "other-shards"
    shutil.copytree(tiny_shards["train"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest, indent=1))  # same rows, another manifest
    with pytest.raises(ValueError, match=r"training shards \(manifest sha256\)"):
        train(_config({"train": str(other)}, out, epochs=2, resume=True))


def test_final_model_names_its_training_run(tiny_shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.pt carries the MLflow run id, so the exported ONNX and the registry link back to the run."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("CAL_POSE_TRACKING", raising=False)
    monkeypatch.delenv("CAL_POSE_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    final = checkpoint.load(train(_config(tiny_shards, tmp_path / "run", method="udp", max_steps=1)))
    assert MlflowClient(uri).get_run(final["run_id"]).info.run_name


def test_stage1_starts_from_pretrained_weights(tiny_shards, tmp_path: Path) -> None:
    """--weights: the paper's models start from ImageNet weights; a full state dict loads exactly."""
    from cal_core.models import build_model
    from cal_core.train import _build_model

    torch.manual_seed(7)
    source = build_model("tiny", "dual", input_size=(64, 48))
    torch.save(source.state_dict(), tmp_path / "pretrained.pt")
    config = _config(tiny_shards, tmp_path / "run", weights=str(tmp_path / "pretrained.pt"))
    model, head = _build_model(config, (64, 48), torch.device("cpu"))
    assert head == "dual"
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    with pytest.raises(ValueError, match="--weights is for stage 1"):
        _config(tiny_shards, tmp_path, stage=2, init="i", gmm="g", weights="w")


def test_a_resumed_attempt_continues_its_mlflow_run(tiny_shards, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried pod resumes last.pt and logs to the run it started, not to a second run beside a dead one."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("CAL_POSE_TRACKING", raising=False)
    monkeypatch.delenv("CAL_POSE_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = {"epochs": 2, "experiment": "resume", "method": "udp"}
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 40 // 8 + 3)  # in epoch 2: 40 samples, batch 8; last.pt is from epoch 1
        with pytest.raises(KeyboardInterrupt):
            train(_config(tiny_shards, tmp_path / "run", **settings))
    first = checkpoint.load(str(tmp_path / "run" / checkpoint.LAST))["mlflow_run_id"]
    assert MlflowClient(uri).get_run(first).info.status == "KILLED"
    final = checkpoint.load(train(_config(tiny_shards, tmp_path / "run", resume=True, **settings)))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert [r.info.run_id for r in runs] == [first] == [final["run_id"]]
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(first, "loss")]
    assert steps == sorted(steps) and steps[-1] == final["step"] and len(set(steps)) == len(steps)


def test_unusable_validation_shards_fail_before_training_and_a_failing_validation_keeps_the_epoch(
        tiny_shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong --val-shards once failed after a whole epoch (on COCO: hours), which was then not saved either."""
    import cal_core.train as train_module

    with pytest.raises(Exception, match="manifest"):
        train(_config(tiny_shards, tmp_path / "missing", val_shards=str(tmp_path / "nowhere"), val_every=1))
    assert not (tmp_path / "missing" / checkpoint.LAST).exists()  # refused before the first step

    def broken(session):
        raise RuntimeError("CUDA out of memory (simulated) in validation")

    real = train_module.validate
    monkeypatch.setattr(train_module, "validate", broken)
    settings = {"val_shards": tiny_shards["val"], "val_every": 1, "epochs": 2}
    with pytest.raises(RuntimeError, match="simulated"):
        train(_config(tiny_shards, tmp_path / "run", **settings))
    state = checkpoint.load(str(tmp_path / "run" / checkpoint.LAST))
    assert state["epoch"] == 1 and state["val_pending"] is True  # the epoch is kept, its validation owed

    # The retried attempt validates epoch 1 first, then trains epoch 2 and validates it: no val point is lost.
    validated = []
    monkeypatch.setattr(train_module, "validate", lambda session: validated.append(session.epoch) or real(session))
    train(_config(tiny_shards, tmp_path / "run", resume=True, **settings))
    assert validated == [1, 2]
    assert [m["epoch"] for m in _val_points(tmp_path / "run")] == [1.0, 2.0]
    # last.pt still says val_pending, validated.json that it was done: a rerun of the finished run scores nothing
    assert checkpoint.load(str(tmp_path / "run" / checkpoint.LAST))["val_pending"] is True
    train(_config(tiny_shards, tmp_path / "run", resume=True, **settings))
    assert validated == [1, 2]
    # ... but a validated.json another training left in the --out is not taken for this one's
    record = json.loads((tmp_path / "run" / "validated.json").read_text())
    (tmp_path / "run" / "validated.json").write_text(json.dumps({**record, "training_id": "another"}))
    train(_config(tiny_shards, tmp_path / "run", resume=True, **settings))
    assert validated == [1, 2, 2]
    # resumed without validation, the owed one is dropped (it once read "None/manifest.json")
    shutil.copytree(tmp_path / "run", tmp_path / "no-val", ignore=shutil.ignore_patterns("model.pt"))
    state = checkpoint.load(str(tmp_path / "no-val" / checkpoint.LAST))
    checkpoint.save(str(tmp_path / "no-val" / checkpoint.LAST), {**state, "epoch": 1, "val_pending": True})
    validated.clear()
    train(_config(tiny_shards, tmp_path / "no-val", resume=True, epochs=2))
    assert validated == []


def test_a_val_set_nobody_is_scored_in_is_refused_before_training(tiny_shards, tmp_path: Path) -> None:
    """GT-box val shards whose people all lack labelled keypoints: once an error after the first epoch."""
    import shutil

    from cal_core.train import SetupError

    val = tmp_path / "val"
    shutil.copytree(tiny_shards["val"], val)
    gt = json.loads((val / "annotations.json").read_text())
    for ann in gt["annotations"]:
        ann["keypoints"], ann["num_keypoints"] = [0] * 51, 0
    (val / "annotations.json").write_text(json.dumps(gt))
    manifest = json.loads((val / "manifest.json").read_text())  # as downsample would have recorded it
    manifest["annotations"]["sha256"] = hashlib.sha256((val / "annotations.json").read_bytes()).hexdigest()
    (val / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SetupError, match="none of its .* people has a labelled keypoint"):
        train(_config(tiny_shards, tmp_path / "run", val_shards=str(val), val_every=1))
    assert not (tmp_path / "run" / checkpoint.LAST).exists()


def test_the_cli_prints_why_training_cannot_start_without_a_traceback(tiny_shards, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from cal_core.cli import main

    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    base = ["train", "--method", "cal", "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"]
    assert main([*base, "--shards", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cal-pose train: ") and "manifest.json" in err and "Traceback" not in err
    assert main([*base, "--shards", tiny_shards["train"], "--lr-steps", "3,x"]) == 2
    assert "lr steps must be comma-separated" in capsys.readouterr().err


def test_a_resume_that_cannot_reattach_its_run_logs_params_on_the_new_one(tiny_shards, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """last.pt names a run another tracking server holds: the resumed attempt opens a run with full params."""
    from mlflow import MlflowClient

    monkeypatch.delenv("CAL_POSE_TRACKING", raising=False)
    monkeypatch.delenv("CAL_POSE_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'first.db'}")
    settings = {"epochs": 2, "experiment": "moved", "method": "udp"}
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 40 // 8 + 3)
        with pytest.raises(KeyboardInterrupt):
            train(_config(tiny_shards, tmp_path / "run", **settings))
    uri = f"sqlite:///{tmp_path / 'second.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    final = checkpoint.load(train(_config(tiny_shards, tmp_path / "run", resume=True, **settings)))
    run = MlflowClient(uri).get_run(final["run_id"])
    assert run.data.params["method"] == "udp" and run.info.status == "FINISHED"
