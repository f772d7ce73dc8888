"""`predict`: exported models on image files, preprocessed as the training data was."""

import csv
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CLASSES, make_run, render, run_cli, tiny_classifier
from PIL import Image

from kd_keras.deploy.predict import (
    describe_recipe,
    predict_files,
    predictions_renderables,
    preprocessing_recipe,
)
from kd_keras.runtimes import keras_predictor, softmax
from kd_keras.workflows.export import export_run


def medmnist_like(path, size: int) -> np.ndarray:
    """The test's own reading of the MedMNIST recipe: centre square crop, grey, bicubic resize
    to 28 px, grey replicated to RGB, bilinear resize to the model's size."""
    img = Image.open(path).convert("L")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    grey = np.asarray(img.resize((28, 28), Image.Resampling.BICUBIC), "float32")
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return tf.image.resize(rgb, (size, size)).numpy().clip(0, 255)


def write_test_images(folder):
    """Grey and RGB PNG / JPEG / BMP files of odd sizes, and one corrupt PNG."""
    rng = np.random.default_rng(7)
    folder.mkdir()
    specs = [("a_grey.png", (37, 23), "L"), ("b_rgb.jpg", (50, 61), "RGB"),
             ("c_grey.jpeg", (29, 90), "L"), ("d_rgb.png", (64, 33), "RGB"),
             ("e_rgb.bmp", (31, 31), "RGB")]  # fmt: skip
    for name, (w, h), mode in specs:
        shape = (h, w) if mode == "L" else (h, w, 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        # a bright centre on half the images so the two classes both occur
        if name < "c":
            pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
        Image.fromarray(pixels, mode).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return [s[0] for s in specs]


def test_predict_folder_matches_keras_and_reports_the_corrupt_file(tmp_path, real_npz):
    keras.utils.set_random_seed(1)
    model = tiny_classifier("tiny_student", 4)
    run = make_run(tmp_path / "r", real_npz, {"student": model}, threshold=0.5)
    export_run(run, tmp_path / "export", formats="onnx,tflite", limit=16, quiet=True)
    good = write_test_images(tmp_path / "imgs")

    expected = softmax(keras_predictor(model)(
        np.stack([medmnist_like(tmp_path / "imgs" / n, 32) for n in good])
    ))  # fmt: skip
    classes = [CLASSES[int(p >= 0.5)] for p in expected[:, 1]]
    for suffix in (".onnx", ".tflite"):
        out = tmp_path / f"pred{suffix}.csv"
        model_file = tmp_path / "export" / "r" / f"student{suffix}"
        code, stdout, _ = run_cli("predict", str(model_file), str(tmp_path / "imgs"),
                                  "--out", str(out))  # fmt: skip
        assert code == 1, "one file failed"
        rows = list(csv.DictReader(out.open()))
        assert [r["file"].rsplit("/", 1)[1] for r in rows] == sorted(good + ["broken.png"])
        ok = [r for r in rows if not r["error"]]
        assert [r["predicted"] for r in ok] == classes
        got = np.array([[float(r["p_normal"]), float(r["p_pneumonia"])] for r in ok])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        bad = next(r for r in rows if r["file"].endswith("broken.png"))
        assert bad["predicted"] == "" and bad["error"].startswith("unreadable image")
        assert "broken.png" in stdout and "1 of 6 files could not be read" in stdout
        assert "medmnist: centre square (short edge) crop, greyscale" in stdout


def test_keras_file_in_a_run_folder_uses_the_run_recipe(tmp_path, real_npz, capsys, caplog):
    model = tiny_classifier("tiny_student", 4)
    run = make_run(tmp_path / "r", real_npz, {"student": model}, threshold=0.5)
    write_test_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").unlink()
    code, stdout, stderr = run_cli("predict", str(run / "student.keras"),
                                   str(tmp_path / "imgs" / "a_grey.png"),
                                   "--out", str(tmp_path / "p.csv"))  # fmt: skip
    assert code == 0, stderr
    assert "from run folder" in stderr and "decision: P(class 1) >= 0.5" in stdout

    alone = tmp_path / "alone.keras"
    model.save(alone)
    code, stdout, stderr = run_cli("predict", str(alone), str(tmp_path / "imgs"),
                                   "--out", str(tmp_path / "q.csv"))  # fmt: skip
    assert code == 0 and "not in a run folder: plain RGB resize" in stderr
    assert "decision: argmax" in stdout

    # the library returns the rows and prints no table; its note is logged, not when quiet
    caplog.set_level(logging.INFO, logger="kd_keras")
    caplog.clear()  # the commands' records above
    result = predict_files(alone, [tmp_path / "imgs"], out=None)
    assert "Predictions of" not in capsys.readouterr().out
    notes = [r.getMessage() for r in caplog.records if r.name == "kd_keras.deploy.predict"]
    assert notes == [result["note"]] and "not in a run folder" in result["note"]
    caplog.clear()
    predict_files(alone, [tmp_path / "imgs"], out=None, quiet=True)
    assert not [r for r in caplog.records if r.name == "kd_keras.deploy.predict"]
    text = render(predictions_renderables(result))
    assert "Predictions of alone.keras" in text and "a_grey.png" in text
    assert "decision: argmax" in text and "written to" not in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx", "."], "model file not found: missing.onnx"),
        (["MODEL", "EMPTY"], "no image files"),
        (["MODEL", "nowhere.png"], "image file or folder not found"),
        (["MODEL"], "no images given"),
    ],
)
def test_user_mistakes_exit_2(tmp_path, args, message):
    model = tmp_path / "m.keras"
    tiny_classifier().save(model)
    (tmp_path / "EMPTY").mkdir()
    args = [str(model) if a == "MODEL" else str(tmp_path / a) if a == "EMPTY" else a for a in args]
    code, _, stderr = run_cli("predict", *args)
    assert code == 2 and message in stderr.strip().splitlines()[-1]


def test_recipes():
    from kd_keras.config import DataConfig

    med = preprocessing_recipe(DataConfig(), 64)
    assert med["source_size"] == 28 and med["color"] == "grey" and med["size"] == 64
    assert describe_recipe(med).startswith("medmnist: centre square (short edge) crop")
    folder = preprocessing_recipe(DataConfig(source="folder", path="x"), 224)
    assert folder["crop"] is None and describe_recipe(folder) == (
        "folder: decode to RGB, resize to 224x224 (bilinear)"
    )


def test_unreadable_images_are_reported_and_bugs_keep_their_type(tmp_path, monkeypatch):
    """PIL's and TensorFlow's errors for a broken file are `decode_errors`; any other exception
    while reading an image (a bug) stops `predict` with its own type and traceback."""
    import kd_keras.deploy.predict
    from kd_keras.data.images import decode_errors, decode_file
    from kd_keras.deploy.predict import predict_files, source_pixels

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[:800])  # truncated
    for recipe in ({"color": "grey"}, {}):
        with pytest.raises(decode_errors()):
            source_pixels(bad, recipe)
    with pytest.raises(decode_errors()):
        decode_file(str(tmp_path / "missing.png")).numpy()

    model = tmp_path / "m.keras"
    tiny_classifier().save(model)

    def bug(path, recipe):
        raise KeyError("bug")

    monkeypatch.setattr(kd_keras.deploy.predict, "source_pixels", bug)
    with pytest.raises(KeyError, match="bug"):
        predict_files(model, [good], out=None, quiet=True)
