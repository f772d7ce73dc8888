"""Issue 20: files from elsewhere are untrusted, nothing is destroyed before it is checked, data
must add up, and degenerate training is not a result. One test (at least) per row of the issue's
table; the inputs are written by the tests."""

import numpy as np
import pytest
from conftest import ROOT, run_cli

from kd_keras.config import DataConfig, build_config
from kd_keras.data import load_npz, load_splits
from kd_keras.errors import KDError

XRAY = str(ROOT / "configs" / "xray.toml")


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def grey(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def labels(n):
    return (np.arange(n) % 2).astype("uint8").reshape(-1, 1)


# ---------------------------------------------------------------- part 3: data that adds up


def test_npz_without_labels_names_the_file_and_key(tmp_path):
    path = write_npz(tmp_path / "nolabels.npz", train_images=grey(8), test_images=grey(4))
    with pytest.raises(KDError, match=r"nolabels.npz has no 'train_labels' array"):
        load_npz(path, None)
    path = write_npz(tmp_path / "noval.npz", train_images=grey(8), train_labels=labels(8),
                     val_labels=labels(2), test_images=grey(4), test_labels=labels(4))  # fmt: skip
    with pytest.raises(KDError, match=r"noval.npz has no 'val_images' array"):
        load_npz(path, None)


def test_npz_images_and_labels_of_unequal_length_are_refused(tmp_path):
    path = write_npz(tmp_path / "short.npz", train_images=grey(40), train_labels=labels(10),
                     test_images=grey(4), test_labels=labels(4))  # fmt: skip
    message = r"short.npz: 'train_images' holds 40 images but 'train_labels' 10 labels"
    with pytest.raises(KDError, match=message):
        load_splits(DataConfig(path=str(path)))


def test_npz_image_dtype_and_range_are_checked(tmp_path):
    def npz(name, images):
        return write_npz(tmp_path / name, train_images=images, train_labels=labels(len(images)),
                         test_images=grey(4), test_labels=labels(4))  # fmt: skip

    unit = npz("unit.npz", grey(8).astype("float32") / 255)
    with pytest.raises(KDError, match=r"looks like \[0, 1\] scaling.*multiplied by 255"):
        load_npz(unit, None)
    wide = npz("wide.npz", grey(8).astype("int32") * 4)
    with pytest.raises(KDError, match=r"values span 0..1020; expected pixels 0..255"):
        load_npz(wide, None)
    text = npz("text.npz", np.full((8, 28, 28), "a"))
    with pytest.raises(KDError, match="expected uint8 pixels"):
        load_npz(text, None)
    ok = npz("float.npz", grey(8).astype("float32"))  # float in 0..255: documented, accepted
    assert load_npz(ok, None)[1]["train"].images.dtype == np.float32


@pytest.mark.parametrize("blob", [b"", b"\x00" * 10, bytes(range(256)) * 4, b"PK\x03\x04"])
def test_corrupt_npz_is_diagnosed_as_corrupt_never_as_pickled(tmp_path, blob):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(len(blob)).bytes(1000) if len(blob) > 500 else blob)
    with pytest.raises(KDError) as info:
        load_npz(path, None)
    assert "not a readable .npz (corrupt or truncated)" in str(info.value)
    assert "pickle" not in str(info.value)


def test_corrupt_npz_from_the_cli_is_one_line(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    code, _, err = run_cli("distill", "--config", XRAY,
                           *sets(f"data.path={path}", f"run.output_dir={tmp_path}"))  # fmt: skip
    assert code == 2 and "not a readable .npz (corrupt or truncated)" in err
    assert "Traceback" not in err and "allow_pickle" not in err
    assert not list(tmp_path.glob("*/config.toml")), "a run refused on its data leaves no folder"


def test_loss_weights_have_upper_bounds():
    for key in ("beta", "dkd_alpha", "dkd_beta"):
        with pytest.raises(KDError, match=f"distill.{key}"):
            build_config({"distill": {key: 1e39}}, ROOT)
