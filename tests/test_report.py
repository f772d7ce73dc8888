"""Results a person can look at: report.html (opened in headless Chromium), the model card,
the sweep page, progress settings and TensorBoard scalars."""

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_run, run_cli, tiny_classifier

from kd_keras.errors import KDError
from kd_keras.run.files import MODEL_STAGES
from kd_keras.run.folder import RunFolder

SECTIONS = ("summary", "training", "evaluation", "mistakes", "deployment", "config")
SCREENSHOT_COPY = ROOT / ".pytest_screenshots" / "report.png"


def _history(stage: str) -> pd.DataFrame:
    """A plausible history_<stage>.csv (what HistoryCSV writes) for three epochs."""
    kd = [0.0, 0.0, 0.0] if stage != "distill" else [0.4, 0.3, 0.25]
    return pd.DataFrame({
        "epoch": [1, 2, 3], "loss": [0.9, 0.6, 0.5], "ce": [0.9, 0.6, 0.5], "kd": kd,
        "feat": kd, "accuracy": [0.6, 0.75, 0.8], "val_accuracy": [0.62, 0.78, 0.76],
        "val_balanced_accuracy": [0.55, 0.74, 0.7], "val_macro_f1": [0.5, 0.7, 0.69],
        "val_auc": [0.7, 0.8, 0.79], "learning_rate": [1e-3, 5e-4, 1e-4],
    })  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, real_npz) -> RunFolder:
    """A run as training leaves it (three one-layer models, histories, training log) on the
    real PneumoniaMNIST file, then evaluated: report.json, predictions, report.html."""
    import keras

    from kd_keras.workflows.distill import evaluate_and_report

    keras.utils.set_random_seed(0)
    folder = make_run(tmp_path_factory.mktemp("runs") / "tiny", real_npz,
                      {name: tiny_classifier(name) for name in MODEL_STAGES})  # fmt: skip
    with (folder / "config.toml").open("a") as fh:
        fh.write('[eval]\nthreshold = "val_balanced_accuracy"\n')
    log = {}
    for stage in MODEL_STAGES.values():
        _history(stage).to_csv(folder / f"history_{stage}.csv", index=False)
        log[stage] = {"seconds": 1.0, "best_epoch": 2, "best_score": 0.74, "epochs": 3}
    (folder / "train_log.json").write_text(json.dumps(log))
    run = RunFolder(folder)
    evaluate_and_report(run)
    return run


# ---------------------------------------------------------------- report.html contents


def test_evaluation_writes_predictions_and_a_self_contained_report(tiny_run):
    from kd_keras.evaluation.metrics import predict_classes
    from kd_keras.evaluation.predictions import load_predictions

    report = tiny_run.report
    for name in MODEL_STAGES:
        p = load_predictions(tiny_run.predictions_path(name))
        assert p.probs.shape == (624, 2) and len(p.labels) == 624
        assert p.threshold == report["models"][name]["threshold"]
        np.testing.assert_array_equal(p.predicted, predict_classes(p.probs, p.threshold))
        # the stored decisions are the ones report.json counted
        wrong = int((p.predicted != p.labels).sum())
        matrix = np.asarray(report["models"][name]["test"]["confusion_matrix"])
        assert wrong == matrix.sum() - np.trace(matrix)
    page = tiny_run.report_html_path.read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert "http://" not in page and "https://" not in page, "no network needed to open it"
    assert not re.search(r'src="(?!data:image/png;base64,)', page), "every image inlined"
    assert "not exported yet" in page and "cli.py export" in page


def test_report_includes_export_and_benchmark_once_they_exist(tiny_run, tmp_path):
    from kd_keras.reporting.run_report import write_run_report

    out = tmp_path / "export"
    folder = tiny_run.export_dir(out)
    folder.mkdir(parents=True)
    metrics = {"accuracy": 0.8, "balanced_accuracy": 0.75, "roc_auc": 0.9}
    (folder / "export.json").write_text(json.dumps({"n_images": 624, "artefacts": {
        "student": {"file": "student.onnx", "size_mb": 1.2, "metrics": metrics,
                    "parity": {"status": "PASS", "max_abs_diff": 1e-6}},
        "student.int8": {"file": "student.int8.onnx", "size_mb": 0.4, "metrics": metrics,
                         "quantization": {"method": "static"},
                         "vs_keras": {"argmax_agreement": 0.99}}}}))  # fmt: skip
    rows = [
        {
            "model": m,
            "format": f,
            "size_mb": s,
            "p50_ms": t,
            "p90_ms": t,
            "throughput_ips": 100.0,
            "balanced_accuracy": 0.7,
            "note": "",
        }
        for m, f, s, t in (("teacher", "onnx", 9.0, 5.0), ("student", "int8", 0.4, 1.0))
    ]
    (folder / "benchmark.json").write_text(json.dumps({"title": "Benchmark", "rows": rows}))
    page = write_run_report(tiny_run, out).read_text()
    assert "student.int8.onnx" in page and "int8 static" in page and "PASS" in page
    assert 'alt="accuracy vs latency and size"' in page and "not exported yet" not in page


def test_a_broken_report_never_fails_evaluation(tiny_run, monkeypatch, capsys):
    import kd_keras.workflows.distill
    from kd_keras.workflows.distill import write_report_after_evaluation

    def broken(run):
        raise ValueError("boom")

    monkeypatch.setattr(kd_keras.workflows.distill, "write_run_report", broken)
    assert write_report_after_evaluation(tiny_run) is None
    out = capsys.readouterr().out
    assert "report.html not written (ValueError: boom)" in out and "cli.py report" in out


def test_a_bug_in_the_report_is_not_swallowed(monkeypatch):
    """Files it cannot read or write are warnings (above); any other exception is a bug and keeps
    its type and traceback."""
    import kd_keras.workflows.distill
    from kd_keras.workflows.distill import write_report_after_evaluation

    def bug(run):
        raise TypeError("bug")

    monkeypatch.setattr(kd_keras.workflows.distill, "write_run_report", bug)
    with pytest.raises(TypeError, match="bug"):
        write_report_after_evaluation(object())


def test_cli_report_rebuilds_and_old_runs_get_notes(tmp_path, tiny_npz):
    folder = make_run(tmp_path / "old", tiny_npz, {"student": tiny_classifier()})
    code, out, err = run_cli("report", "--run", str(folder))
    assert code == 0, err
    page = (folder / "report.html").read_text()
    assert "not evaluated yet" in page and "history_&lt;stage&gt;.csv" in page
    code, _, err = run_cli("report", "--run", str(tmp_path / "missing"))
    assert code == 2 and err.strip() == f"error: run folder not found: {tmp_path / 'missing'}"


def test_markdown_tables_become_html_tables():
    from kd_keras.reporting.html import markdown_html

    html = markdown_html("# T `x`\n\n| a | b |\n|---|---|\n| 1 | **2** |\n\n- item <b>")
    assert "<h3>T <code>x</code></h3>" in html
    assert "<tr><th>a</th><th>b</th></tr>" in html and "<td><strong>2</strong></td>" in html
    assert "<li>item &lt;b&gt;</li>" in html


# ---------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it with apt-get)")
        pytest.skip("chromium is not installed: apt-get install chromium")
    return path


class Browser:
    """Headless Chromium driven over the DevTools protocol (websocket-client): load a page,
    collect console errors and failed loads, evaluate JavaScript, take a screenshot."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", "--hide-scrollbars")  # fmt: skip

    def __init__(self, binary: str):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="kd_keras_chromium_")
        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(e.get("method") == event for e in self.events):
                return
            try:
                self.events.append(json.loads(self.ws.recv()))
            except TimeoutError:
                break
        raise TimeoutError(f"no {event} within {timeout} s")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed resource loads seen so far."""
        found = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append(f"console: {p.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {p.get('exceptionDetails')}")
            elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                found.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif method == "Network.loadingFailed":
                found.append(f"load failed: {p.get('errorText')}")
        return found

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.mark.slow  # starts a headless browser
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    browser = Browser(_chromium())
    try:
        browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=900,
                     deviceScaleFactor=1, mobile=False)  # fmt: skip
        browser.call("Page.navigate", url=tiny_run.report_html_path.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        images = browser.evaluate(
            "[...document.images].map(i => ({alt: i.alt, complete: i.complete, "
            "width: i.naturalWidth, height: i.naturalHeight}))"
        )
        sections = browser.evaluate(
            "[...document.querySelectorAll('section')].map(s => ({id: s.id, "
            "title: s.querySelector('h2').innerText, height: s.offsetHeight}))"
        )
        tables = browser.evaluate("document.querySelectorAll('table').length")
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        errors = browser.errors()
    finally:
        browser.close()

    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    SCREENSHOT_COPY.parent.mkdir(exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    print(f"\nscreenshot of report.html: {screenshot} (copy: {SCREENSHOT_COPY})")

    assert errors == []
    assert [s["id"] for s in sections] == list(SECTIONS)
    assert all(s["height"] > 40 for s in sections), sections
    assert tables >= 2, "results and imbalanced-subset tables"
    alts = [i["alt"] for i in images]
    for alt in ("training curves of stage teacher", "training curves of stage distill",
                "training curves of stage scratch", "confusion matrix of student",
                "ROC curves", "precision-recall curves", "reliability diagrams",
                "test images student got wrong"):  # fmt: skip
        assert alt in alts, alt
    broken = [i for i in images if not i["complete"] or i["width"] == 0]
    assert broken == [], "every image decodes"
    from PIL import Image

    with Image.open(screenshot) as im:
        assert im.width == 1400 and im.height > 3000, im.size


# ---------------------------------------------------------------- model card


def test_model_card_quotes_report_json(tiny_run, tmp_path):
    from kd_keras.evaluation.evaluate import imbalanced_subset_table
    from kd_keras.workflows.export import export_run

    result = export_run(tiny_run.path, out_dir=tmp_path / "export", models=("student",), quiet=True)
    card_path = Path(result["model_card"])
    assert card_path == tiny_run.model_card_path(tmp_path / "export") and card_path.is_file()
    card = card_path.read_text()
    entry = tiny_run.report["models"]["student"]
    test = entry["test"]
    line = next(x for x in card.splitlines() if x.startswith("- accuracy **"))
    quoted = [float(v) for v in re.findall(r"\*\*([0-9.]+)\*\*", line)]
    expected = [test[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")]
    assert quoted == [round(v, 3) for v in expected]
    assert f"≥ {entry['threshold']:.3f} (threshold chosen on the validation split)" in card
    for name, m in test["per_class"].items():
        assert f"{name}: recall {m['recall']:.3f}, precision {m['precision']:.3f}" in card
    assert imbalanced_subset_table(tiny_run.report) in card, "the imbalanced-subset table, verbatim"
    onnx_metrics = result["artefacts"]["student"]["metrics"]
    assert "| student.onnx | fp32 |" in card
    assert f"{onnx_metrics['balanced_accuracy']:.3f}" in card
    for heading in ("## Model details", "## Intended use", "## Out-of-scope use",
                    "## Training data", "## Preprocessing", "## Evaluation",
                    "## Limitations"):  # fmt: skip
        assert heading in card
    assert "not a medical device" in card.lower() and "32 px on pneumoniamnist" in card
    counts = tiny_run.report["data"]["test"]
    assert f"| test | {counts['normal']} | {counts['pneumonia']} | 624 |" in card
    assert card.startswith("---\n") and "value: " + f"{test['accuracy']:.3f}" in card


# ---------------------------------------------------------------- sweep page


def test_sweep_results_html(tmp_path):
    from kd_keras.config import build_config
    from kd_keras.reporting.sweep_report import summarize, write_results

    runs = []
    for t in (1, 4):
        for a in (0.1, 0.9):
            setting = {"distill.temperature": t, "distill.alpha": a}
            for seed, v in ((42, 0.80), (43, 0.84)):
                runs.append({"name": f"temperature={t}_alpha={a}", "setting": setting,
                             "seed": seed, "val_bal_acc": v + t / 100, "test_bal_acc": v,
                             "test_acc": v, "test_auc": v, "subset_bal_acc": v - a / 10,
                             "subset_minority_recall": v})  # fmt: skip
    base = build_config({"run": {"name": "s"}}, tmp_path)
    write_results(tmp_path, runs, summarize(runs), ["distill.temperature", "distill.alpha"],
                  base)  # fmt: skip
    page = (tmp_path / "results.html").read_text()
    for sid in ("results", "ablation", "heatmap", "seeds"):
        assert f'<section id="{sid}">' in page
    assert 'alt="temperature x alpha heatmaps"' in page
    assert 'alt="per-cell spread over seeds"' in page
    assert "temperature=4_alpha=0.1" in page and "0.820 ± 0.028" in page


def test_sweep_progress_line():
    from kd_keras.workflows.sweep import SweepProgress

    clock = iter([0.0, 0.0, 60.0, 60.0, 120.0])
    progress = SweepProgress(4, clock=lambda: next(clock))
    first = progress.start("teacher")
    progress.done(trained=True)
    second = progress.start("scratch seed 42")
    assert first.startswith("[sweep 1/4] teacher") and "left" not in first
    assert second.startswith("[sweep 2/4] scratch seed 42") and "elapsed 1m00s" in second
    assert "about 3m00s left" in second


# ---------------------------------------------------------------- progress and TensorBoard


def test_verbose_auto_and_tensorboard_keys(tmp_path):
    from kd_keras.config import build_config, load_config
    from kd_keras.distill.callbacks import keras_verbose

    cfg = build_config({}, tmp_path)
    assert cfg.train.verbose == "auto" and cfg.train.tensorboard is False
    assert build_config({"train": {"verbose": 2}}, tmp_path).train.verbose == 2
    with pytest.raises(KDError, match=r"train\.verbose = 'loud' is not one of 0, 1, 2, 'auto'"):
        build_config({"train": {"verbose": "loud"}}, tmp_path)
    with pytest.raises(KDError, match=r"train\.verbose must be of type int or str"):
        build_config({"train": {"verbose": 1.5}}, tmp_path)
    with pytest.raises(KDError, match=r"train\.verbose must be of type int or str, got True"):
        build_config({"train": {"verbose": True}}, tmp_path)

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert keras_verbose("auto", Stream(True)) == 1 and keras_verbose("auto", Stream(False)) == 2
    assert keras_verbose(0, Stream(True)) == 0
    for path in sorted((ROOT / "configs").glob("*.toml")):
        assert load_config(path).train.verbose == "auto", path.name


@pytest.mark.slow
def test_tiny_distill_writes_tensorboard_scalars_and_report(tmp_path, real_npz):
    import tensorflow as tf

    sets = [f"data.path={real_npz}", f"run.output_dir={tmp_path}", "run.name=tb",
            "data.image_size=32", "data.limit_train=96", "train.epochs=2", "teacher.epochs=1",
            "student.epochs=2", "teacher.variant=tiny", "student.variant=tiny",
            "train.tensorboard=true", "train.stages=[\"teacher\", \"distill\"]"]  # fmt: skip
    # one epoch on 96 images may end near chance: --force keeps it (the test is about the logs)
    code, out, err = run_cli("distill", "--config", str(ROOT / "configs" / "xray.toml"), "--force",
                             *[a for s in sets for a in ("--set", s)])  # fmt: skip
    assert code == 0, err[-3000:]
    run = RunFolder(tmp_path / "tb")
    tags = {}
    for event_file in run.tensorboard_dir("distill").rglob("events.out.tfevents.*"):
        found = tags.setdefault(event_file.parent.name, set())
        for record in tf.data.TFRecordDataset(str(event_file)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            found |= {v.tag for v in event.summary.value}
    loss_terms = {"epoch_loss", "epoch_ce", "epoch_kd", "epoch_feat"}
    assert loss_terms | {"epoch_accuracy", "epoch_learning_rate"} <= tags["train"], tags
    assert {"epoch_accuracy", "epoch_balanced_accuracy", "epoch_auc"} <= tags["validation"]
    assert run.tensorboard_dir("teacher").is_dir()
    history = pd.read_csv(run.history_path("distill"))
    assert "learning_rate" in history and len(history) == 2
    page = run.report_html_path.read_text()
    assert 'alt="training curves of stage distill"' in page
