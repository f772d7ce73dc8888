"""The CLI: end to end on the real PneumoniaMNIST file at tiny size, and user mistakes.

Commands run in-process (`run_cli`); one test runs a subprocess, because what it checks is the
process itself (TensorFlow's start-up lines, then our single error line)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from kd_keras.errors import KDError

XRAY = str(ROOT / "configs" / "xray.toml")
RUN_FILES = (
    "config.toml", "teacher.keras", "student.keras", "student_scratch.keras", "report.json",
    "report.md", "history_teacher.csv", "history_distill.csv", "history_scratch.csv",
    "confusion_student.png", "confusion_student.json",
)  # fmt: skip


def tiny_overrides(npz, out, *extra):
    sets = [f"data.path={npz}", f"run.output_dir={out}", "run.name=tiny", "data.image_size=32",
            "data.limit_train=160", "train.epochs=1", "teacher.epochs=1", "student.epochs=1",
            *extra]  # fmt: skip
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.slow
def test_distill_end_to_end_then_evaluate_and_export(real_npz, tmp_path, monkeypatch):
    """The README's main path: configs/xray.toml with its real-size ResNet18 student (the
    file that is exported) and the tiny variant of its ResNet50 teacher (real-size builds of
    every architecture are checked in tests/test_models.py), on the real data."""
    code, out, err = run_cli(
        "distill",
        "--config",
        XRAY,
        *tiny_overrides(real_npz, tmp_path, "teacher.variant=tiny", "teacher.epochs=3"),
    )
    assert code == 0, err[-3000:]
    run = tmp_path / "tiny"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student", "student_scratch"]
    assert report["class_names"] == ["normal", "pneumonia"] and report["test_size"] == 624
    student = report["models"]["student"]
    assert sum(map(sum, student["test"]["confusion_matrix"])) == 624
    assert sum(map(sum, student["test_subset"]["confusion_matrix"])) == 300
    assert "| student |" in out and "recall normal" in out
    assert "kd:" in out and "feat:" in out  # per-term metrics reported
    assert "soft KD at T 4.0" in out
    # the run says what ran: the host per stage, with oneDNN on (any x86 host), and why
    from kd_keras.host import isa_level

    assert out.count("host: ") == 1 and "oneDNN on" in out and "precision: float32" in out
    log = json.loads((run / "train_log.json").read_text())
    assert all(entry["peak_rss_mb"] > 0 for entry in log.values()), log
    for stage in ("teacher", "distill", "scratch"):
        host = log[stage]["host"]
        assert host["isa_level"] == isa_level() and host["onednn"] is True
        assert host["fp32_peak_gflops"] > 0 and host["threads"] >= 1
        assert log[stage]["jit_compile"].startswith("False (auto:")
    assert "trained on" in (run / "report.html").read_text()

    code, out, err = run_cli("evaluate", "--run", str(run))
    assert code == 0, err[-3000:]
    recomputed = json.loads((run / "report.json").read_text())
    for name, entry in report["models"].items():
        assert recomputed["models"][name]["test"] == entry["test"]
        assert recomputed["models"][name]["threshold"] == entry["threshold"]

    monkeypatch.chdir(tmp_path)  # export's default output folder is ./export
    code, out, err = run_cli("export", "--onnx", "--run", str(run), "--no-teacher")
    assert code == 0, err[-3000:]
    exported = json.loads((tmp_path / "export" / "tiny" / "export.json").read_text())
    assert exported["artefacts"]["student"]["parity"]["status"] == "PASS"
    assert exported["peak_rss_mb"] > 0
    assert exported["artefacts"]["student"]["metrics"]["balanced_accuracy"] == pytest.approx(
        student["test"]["balanced_accuracy"], abs=0.002
    ), "the ONNX file scores what the report says"


def test_bad_config_key_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[distill]\ntemprature = 2.0\n")
    code, _, err = run_cli("distill", "--config", str(bad))
    assert code == 2 and err.count("\n") == 1, err
    assert "distill.temprature" in err and "Traceback" not in err


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    with pytest.raises(KDError, match="not a run folder"):
        run_cli("--debug", "evaluate", "--run", str(tmp_path))


def test_missing_data_file_is_the_last_stderr_line_of_the_process(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "distill", "--config", XRAY,
         "--set", f"data.path={tmp_path / 'absent.npz'}", "--set", f"run.output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    # TensorFlow's own start-up log lines may precede it; ours is the last line
    assert res.stderr.strip().splitlines()[-1].startswith("error: data file not found")
    assert "absent.npz" in res.stderr


def test_evaluate_without_run_folder(tmp_path):
    code, _, err = run_cli("evaluate", "--run", str(tmp_path / "nothing"))
    assert code == 2 and "run folder not found" in err


def test_benchmark_rejects_a_non_positive_image_size():
    for size in ("0", "-5"):
        code, _, err = run_cli("benchmark", "--image-size", size)
        assert code == 2 and "--image-size must be a positive number" in err, err


# ---------------------------------------------------------------- one grammar (fast: no model)


def run_folder(path):
    """A folder RunFolder.find accepts (what the commands below get is recorded, not run)."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'[run]\nname = "{path.name}"\n')
    return path


@pytest.fixture
def calls(monkeypatch):
    """The library functions the commands call, replaced by recorders: {name: (args, kwargs)}."""
    import kd_keras.deploy.benchmark
    import kd_keras.deploy.tables
    import kd_keras.reporting.run_report
    import kd_keras.workflows.distill
    import kd_keras.workflows.export

    seen = {}

    def recorder(name, result=None):
        def record(*args, **kwargs):
            seen[name] = (args, kwargs)
            return result

        return record

    monkeypatch.setattr(kd_keras.workflows.export, "export_run", recorder("export_run"))
    monkeypatch.setattr(kd_keras.deploy.benchmark, "benchmark_run", recorder("benchmark_run"))
    monkeypatch.setattr(kd_keras.deploy.benchmark, "benchmark_arch", recorder("benchmark_arch"))
    for renderer in ("summary_renderables", "benchmark_renderables"):  # no result to render
        monkeypatch.setattr(kd_keras.deploy.tables, renderer, lambda result: [])
    monkeypatch.setattr(
        kd_keras.reporting.run_report, "write_run_report", recorder("write_run_report", "x")
    )
    monkeypatch.setattr(kd_keras.workflows.distill, "evaluate_and_report", recorder("evaluate", {}))
    monkeypatch.setattr("kd_keras.evaluation.evaluate.report_markdown", lambda report: "table")
    return seen


def one_error_line(code, err, *needles):
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_program_name_is_what_the_user_typed():
    from kd_keras import prog

    assert prog.detect(["/venv/bin/kd-keras"], ["/venv/bin/python", "/venv/bin/kd-keras"]) == (
        "kd-keras"
    )
    assert prog.detect(["cli.py"], ["python3", "cli.py"]) == "python3 cli.py"
    assert prog.detect(["../kd/cli.py"], ["/usr/bin/python", "../kd/cli.py"]) == (
        "python ../kd/cli.py"
    )
    main_py = str(ROOT / "kd_keras" / "__main__.py")
    assert prog.detect([main_py], ["python", "-m", "kd_keras"]) == "python -m kd_keras"
    assert prog.detect(["/venv/bin/pytest"], ["python", "-m", "pytest"]) == prog.DEFAULT
    try:
        prog.set_name("kd-keras")
        assert prog.command("export --onnx") == "kd-keras export --onnx"
    finally:
        prog.set_name(None)
    assert prog.command("export --onnx") == "python cli.py export --onnx"


NO_TENSORFLOW = """
import runpy, sys
sys.argv = ["cli.py", *sys.argv[1:]]
try:
    runpy.run_path("cli.py", run_name="__main__")
except SystemExit as exit_:
    code = exit_.code
heavy = [m for m in ("tensorflow", "keras", "onnx", "onnxruntime") if m in sys.modules]
print("HEAVY", heavy, "CODE", code)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["export", "--help"],
        ["benchmark", "--help"],
        ["benchmark-arch", "--help"],
    ],
)
def test_help_and_version_do_not_import_tensorflow(args):
    res = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, *args], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert "HEAVY [] CODE 0" in res.stdout, res.stdout + res.stderr
    if args == ["--help"]:
        assert "Usage: python cli.py" in res.stdout
        assert "--debug" in res.stdout and "--version" in res.stdout
        assert "benchmark-arch" in res.stdout


def test_usage_line_names_the_shim_the_module_and_the_console_script():
    import os
    import shutil

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    runs = [
        ([sys.executable, "cli.py", "evaluate", "--help"], "Usage: python cli.py evaluate"),
        ([sys.executable, "-m", "kd_keras", "--help"], "Usage: python -m kd_keras"),
    ]
    script = shutil.which("kd-keras", path=str(Path(sys.executable).parent))
    if script:
        runs.append(([script, "--help"], "Usage: kd-keras [OPTIONS] COMMAND"))
    for cmd, usage in runs:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert res.returncode == 0 and usage in res.stdout, (cmd, res.stdout, res.stderr)


def test_version_is_the_installed_one():
    import importlib.metadata

    code, out, _ = run_cli("--version")
    assert code == 0 and out == f"kd_keras {importlib.metadata.version('kd_keras')}\n"


def test_debug_is_global_and_may_come_anywhere(tmp_path):
    with pytest.raises(KDError, match="not a run folder"):
        run_cli("evaluate", "--run", str(tmp_path), "--debug")
    code, out, _ = run_cli("--help")
    assert code == 0 and "--debug" in out and "--version" in out


def test_usage_mistakes_are_one_error_line():
    code, _, err = run_cli("evaluate", "--bogus")
    one_error_line(code, err, "--bogus", "evaluate --help")
    code, _, err = run_cli("export", "--onnx", "--tolerance", "abc")
    one_error_line(code, err, "--tolerance", "valid number")
    code, _, err = run_cli("nocommand")
    one_error_line(code, err, "nocommand")


def test_export_format_is_the_one_way_and_the_flags_its_aliases(tmp_path, calls):
    run = run_folder(tmp_path / "r")
    for args in (
        ["--format", "onnx,tflite"],
        ["--onnx", "--tflite"],
        ["--format", "onnx", "--format", "tflite"],
        ["--tflite", "--format", "onnx"],
    ):
        code, _, err = run_cli("export", "--run", str(run), *args)
        assert code == 0, err
        assert sorted(calls.pop("export_run")[1]["formats"]) == ["onnx", "tflite"]
    code, _, err = run_cli("export", "--run", str(run), "--format", "onnx,coreml")
    one_error_line(code, err, "'coreml'", "valid: onnx, tflite")
    code, _, err = run_cli("export", "--run", str(run))
    one_error_line(code, err, "choose a format: --onnx and/or --tflite", "--format")
    assert "export_run" not in calls


def test_benchmark_format_and_its_deprecated_spelling(tmp_path, calls):
    run = run_folder(tmp_path / "r")
    code, _, err = run_cli("benchmark", "--run", str(run), "--format", "keras,onnx")
    assert code == 0 and err == "", err
    assert calls.pop("benchmark_run")[1]["formats"] == ("keras", "onnx")
    code, _, err = run_cli("benchmark", "--run", str(run), "--formats", "tflite")
    assert code == 0 and err.count("\n") == 1 and "note: --formats is deprecated" in err, err
    assert calls.pop("benchmark_run")[1]["formats"] == ("tflite",)
    code, _, _ = run_cli("benchmark", "--run", str(run))
    from kd_keras.deploy.timing import FORMATS

    assert calls.pop("benchmark_run")[1]["formats"] == FORMATS
    code, _, err = run_cli("benchmark", "--run", str(run), "--format", "keras,onnnx")
    one_error_line(code, err, "'onnnx'", "valid: keras, onnx, int8, tflite, tflite_int8")
    code, _, err = run_cli("benchmark-arch", "--format", "fp16")
    one_error_line(code, err, "'fp16'", "valid: keras, onnx")
    code, out, _ = run_cli("benchmark", "--help")
    assert "--formats" not in out and "--format" in out


def test_benchmark_arch_and_the_deprecated_fresh(tmp_path, calls):
    code, _, err = run_cli(
        "benchmark-arch",
        "--teacher",
        "vit_base",
        "--student",
        "vit_small",
        "--image-size",
        "64",
        "--patch-size",
        "8",
        "--out",
        str(tmp_path),
    )
    assert code == 0 and err == "", err
    args, kwargs = calls.pop("benchmark_arch")
    assert args == ("vit_base", "vit_small", 64)
    assert kwargs["patch_size"] == 8 and kwargs["out"] == tmp_path and kwargs["data"] is None
    code, _, err = run_cli("benchmark", "--fresh", "--student", "mobilenet_v3", "--data", "d.npz")
    assert code == 0 and err.count("\n") == 1, err
    assert "note: benchmark --fresh is deprecated" in err and "benchmark-arch" in err
    args, kwargs = calls.pop("benchmark_arch")
    assert args == ("resnet50", "mobilenet_v3", 224) and kwargs["patch_size"] == 16
    assert kwargs["data"] == Path("d.npz")
    for option, value in (("--teacher", "vit_base"), ("--student", "resnet18"),
                          ("--patch-size", "8"), ("--data", "d.npz")):  # fmt: skip
        code, _, err = run_cli("benchmark", option, value)
        one_error_line(code, err, f"{option} is an option of benchmark-arch")
    run = run_folder(tmp_path / "r")
    for option, value in (("--run", str(run)), ("--config", str(run / "config.toml"))):
        code, _, err = run_cli("benchmark", "--fresh", option, value)
        assert code == 2 and f"error: {option} cannot be used with --fresh" in err, err
    assert not calls
    code, out, _ = run_cli("benchmark", "--help")
    assert "--fresh" not in out and "--teacher" not in out and "benchmark-arch" in out


def test_run_defaults_to_the_config_s_run_folder_else_the_latest(tmp_path, calls, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("evaluate")  # no --run needed any more; none under runs/
    one_error_line(code, err, "no run found under runs")
    latest = run_folder(tmp_path / "runs" / "latest")
    mine = run_folder(tmp_path / "elsewhere" / "mine")
    config = tmp_path / "mine.toml"
    config.write_text(f'[run]\noutput_dir = "{tmp_path / "elsewhere"}"\nname = "mine"\n')
    commands = {"evaluate": (), "report": (), "export": ("--onnx",), "benchmark": ()}
    recorded = {"evaluate": "evaluate", "report": "write_run_report", "export": "export_run",
                "benchmark": "benchmark_run"}  # fmt: skip
    for command, extra in commands.items():
        for args, expected in (((), latest), (("--config", str(config)), mine),
                               (("-c", str(config), "--run", str(mine)), mine),
                               (("--run", str(latest)), latest)):  # fmt: skip
            code, _, err = run_cli(command, *args, *extra)
            assert code == 0, (command, args, err)
            got = Path(calls.pop(recorded[command])[0][0]).resolve()
            assert got == expected.resolve(), (command, args)
        code, _, err = run_cli(command, "--config", str(config), "--run", str(latest), *extra)
        one_error_line(code, err, "--run", "is not the run folder of --config")
    assert not calls


OPTS = ("--out", "--export-dir")


def test_out_is_an_output_and_export_dir_the_export_folder_read(tmp_path, calls):
    run = run_folder(tmp_path / "r")
    exports = tmp_path / "exports"
    code, _, err = run_cli("report", "--run", str(run), "--export-dir", str(exports))
    assert code == 0 and err == "" and calls.pop("write_run_report")[0] == (run, exports), err
    code, _, err = run_cli("report", "--run", str(run), "--out", str(exports))
    assert code == 0 and "note: report --out is deprecated" in err and "--export-dir" in err
    assert calls.pop("write_run_report")[0] == (run, exports)
    code, _, err = run_cli("benchmark", "--run", str(run), "--export-dir", str(exports))
    assert code == 0 and err == "" and calls.pop("benchmark_run")[1]["export_dir"] == exports
    code, _, err = run_cli("benchmark", "--run", str(run), "--out", str(exports))
    assert code == 0 and "note: benchmark --out is deprecated: use --export-dir" in err
    assert calls.pop("benchmark_run")[1]["export_dir"] == exports
    for command in ("report", "benchmark"):
        code, _, err = run_cli(command, "--run", str(run), "--out", "a", "--export-dir", "b")
        one_error_line(code, err, "give --export-dir only")
    code, _, err = run_cli("export", "--onnx", "--run", str(run), "--out", str(exports))
    assert code == 0 and calls.pop("export_run")[1]["out_dir"] == exports
    assert not calls
    for command in ("export", "predict", "compare", "benchmark-arch", "report", "benchmark"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0
        has = {o: bool(re.search(rf"^\W*{o}\s+-?\w*\s*<path>", out, re.M)) for o in OPTS}
        assert has["--out"] == (command not in ("report", "benchmark")), (command, out)
        assert has["--export-dir"] == (command in ("report", "benchmark")), (command, out)


def test_teacher_is_a_yes_no_in_export_and_an_architecture_in_benchmark_arch(tmp_path, calls):
    run = run_folder(tmp_path / "r")
    code, _, _ = run_cli("export", "--onnx", "--run", str(run), "--no-teacher")
    assert code == 0 and calls.pop("export_run")[1]["models"] == ("student",)
    code, _, _ = run_cli("export", "--onnx", "--run", str(run))
    assert code == 0 and calls.pop("export_run")[1]["models"] == ("student", "teacher")
    code, out, _ = run_cli("export", "--help")
    assert "--no-teacher" in out and "architecture" in out
    code, out, _ = run_cli("benchmark-arch", "--help")
    assert "--teacher" in out and "yes/no" in out and "resnet50" in out


def test_the_cli_shows_library_messages_on_stdout_as_plain_lines():
    """Library code logs; the command line's handler writes INFO and up to stdout, message
    only, exactly as the prints it replaced."""
    import logging

    from kd_keras.cli.app import StdoutHandler, show_library_messages

    show_library_messages()
    show_library_messages()
    handlers = logging.getLogger("kd_keras").handlers
    assert sum(isinstance(h, StdoutHandler) for h in handlers) == 1, "installed once"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        logging.getLogger("kd_keras.distill.stages").info("\n== stage distill: kept")
        logging.getLogger("kd_keras.workflows.distill").warning("warning: x not written")
        logging.getLogger("kd_keras.data.checks").debug("hidden")
    assert out.getvalue() == "\n== stage distill: kept\nwarning: x not written\n"

    # while a command whose stdout is its result table runs, they go to stderr
    from kd_keras.cli.app import messages_on_stderr

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with messages_on_stderr():
            logging.getLogger("kd_keras.deploy.export").info("student: converting …")
        logging.getLogger("kd_keras.workflows.sweep").info("after")
    assert err.getvalue() == "student: converting …\n" and out.getvalue() == "after\n"
