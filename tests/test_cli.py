"""The ``cal-pose`` entry point: user mistakes are one line and an exit code, never a traceback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cal_core import cli


def test_input_errors_are_one_line_with_exit_code_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(["register", "--model", str(tmp_path / "none.onnx"), "--metrics", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cal-pose register: ") and "Traceback" not in err
    assert cli.main(["fit-gmm", "--checkpoint", "x.pt", "--shards", "s", "--out", "o", "--components", "0"]) == 2
    assert "--components must be 'auto', 'paper' or a positive integer" in capsys.readouterr().err
    for flag, value in (("--max-samples", "-1"), ("--max-components", "0")):  # -1 once fitted on a subset
        assert cli.main(["fit-gmm", "--checkpoint", "x.pt", "--shards", "s", "--out", "o", flag, value]) == 2
        assert "need --max-components >= 1, --max-samples >= 0" in capsys.readouterr().err


def test_an_output_the_machine_refuses_is_one_line_before_any_work(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A file as --out once failed with a traceback after a whole decoding pass (downsample) or an epoch (train)."""
    (tmp_path / "a-file").write_text("not a folder")
    out = str(tmp_path / "a-file")
    assert cli.main(["downsample", "--coco", str(tmp_path / "no-coco"), "--split", "val", "--out", out,
                     "--input-size", "64x48"]) == 2  # refused before the (missing) annotation file is read
    assert f"cal-pose downsample: cannot write to {out}" in capsys.readouterr().err
    assert cli.main(["fit-gmm", "--checkpoint", "x.pt", "--shards", "s", "--out", out]) == 2
    assert f"cal-pose fit-gmm: cannot write to {out}" in capsys.readouterr().err


def test_other_os_errors_are_one_line_with_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import cal_core.register as register

    def refused(args: argparse.Namespace) -> int:
        raise PermissionError(13, "Permission denied", "/models/out")

    monkeypatch.setattr(register, "run", refused)
    assert cli.main(["register", "--model", "m", "--metrics", "x"]) == 1
    assert capsys.readouterr().err == "cal-pose register: [Errno 13] Permission denied: '/models/out'\n"


def test_a_stage_that_failed_is_one_line_with_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A dead downsampling worker and a failed parity check: what the stage modules once printed themselves."""
    from cal_core import export
    from cal_core.data import downsample

    for module, error in ((downsample, downsample.WorkerCrashError("a worker died")),
                          (export, export.ParityError("onnxruntime vs torch mismatch"))):
        def failed(args: argparse.Namespace, error: Exception = error) -> int:
            raise error

        monkeypatch.setattr(module, "run", failed)
        name = "downsample" if module is downsample else "export"
        flags = (["--coco", "c", "--split", "val", "--out", "o", "--input-size", "64x48"] if name == "downsample"
                 else ["--checkpoint", "c.pt", "--out", "o"])
        assert cli.main([name, *flags]) == 1
        assert capsys.readouterr().err == f"cal-pose {name}: {error}\n"


def test_the_traceback_switch_and_ctrl_c(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import cal_core.register as register

    def bad(args: argparse.Namespace) -> int:
        raise ValueError("a bad value")

    monkeypatch.setattr(register, "run", bad)
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="a bad value"):
        cli.main(["register", "--model", "m", "--metrics", "x"])

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(register, "run", interrupted)
    assert cli.main(["register", "--model", "m", "--metrics", "x"]) == 130
    assert capsys.readouterr().err == "cal-pose register: interrupted\n"


def test_pipeline_submit_checks_parameters_first_and_names_an_unreachable_host(
        capsys: pytest.CaptureFixture[str]) -> None:
    host = "http://127.0.0.1:9"  # nothing listens on the discard port
    assert cli.main(["pipeline", "submit", "--host", host, "--param", "nosuch=1"]) == 2
    assert "unknown pipeline parameter 'nosuch'" in capsys.readouterr().err
    assert cli.main(["pipeline", "submit", "--host", host, "--param", "epochs_stage1=5"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Kubeflow Pipelines API at {host}" in err and "Traceback" not in err
