import numpy as np
import pytest
from conftest import url_fetch_failure, write_cifar_batches, write_images

from kd_keras.config import AugmentConfig, DataConfig
from kd_keras.data.pipeline import make_dataset, training_steps
from kd_keras.data.sources import load_splits, resolve_medmnist_path, stratified_subset
from kd_keras.errors import KDError


def first_batch(split, size=32, **kw):
    x, y = next(iter(make_dataset(split, size, 8, **kw)))
    return x.numpy(), y.numpy()


def test_real_pneumoniamnist(real_npz):
    splits = load_splits(DataConfig(path=str(real_npz)))
    assert splits.class_names == ["normal", "pneumonia"]
    assert splits.summary() == {
        "train": {"normal": 1214, "pneumonia": 3494},
        "val": {"normal": 135, "pneumonia": 389},
        "test": {"normal": 234, "pneumonia": 390},
    }
    x, y = first_batch(splits.test, size=40)
    assert x.shape == (8, 40, 40, 3) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 255
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey replicated to RGB
    np.testing.assert_array_equal(y, splits.test.labels[:8])  # evaluation keeps order


def test_npz_found_through_env_var(real_npz, monkeypatch):
    monkeypatch.setenv("KD_KERAS_DATA_DIR", str(real_npz.parent))
    assert resolve_medmnist_path("pneumoniamnist", 28, None) == real_npz


def test_val_split_carved_stratified_and_limit(tiny_npz):
    splits = load_splits(DataConfig(path=str(tiny_npz), val_fraction=0.25), seed=1)
    assert len(splits.train) == 30 and len(splits.val) == 10
    assert np.bincount(splits.val.labels).tolist() == [3, 7]
    again = load_splits(DataConfig(path=str(tiny_npz), val_fraction=0.25), seed=1)
    np.testing.assert_array_equal(splits.val.images, again.val.images)
    limited = load_splits(DataConfig(path=str(tiny_npz), val_fraction=0.25, limit_train=10))
    assert len(limited.train) == 10 and set(limited.train.labels) == {0, 1}
    assert len(stratified_subset(np.array([0, 1] * 5), 4, 0)) == 4


def test_missing_and_corrupt_npz(tmp_path):
    with pytest.raises(KDError, match="data file not found: .*nope.npz"):
        load_splits(DataConfig(path=str(tmp_path / "nope.npz")))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(KDError, match="bad.npz is not a readable .npz"):
        load_splits(DataConfig(path=str(bad)))


def test_image_folders_kermany_layout(tmp_path):
    root = tmp_path / "chest_xray"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        write_images(root / split / "NORMAL", n)
        write_images(root / split / "PNEUMONIA", n + 1, mode="RGB", ext=".png")
    splits = load_splits(DataConfig(source="folder", path=str(root)))
    assert splits.class_names == ["NORMAL", "PNEUMONIA"]
    assert splits.summary()["test"] == {"NORMAL": 3, "PNEUMONIA": 4}
    x, y = first_batch(splits.train, size=36, training=True, augment=AugmentConfig())
    assert x.shape[1:] == (36, 36, 3) and x.min() >= 0 and x.max() <= 255


def test_csv_layout_with_names_and_missing_image(tmp_path):
    root = tmp_path / "dataset"
    for split in ("train", "test"):
        names = write_images(root / split, 6, mode="RGB")
        rows = [f"{n},{i % 2}" for i, n in enumerate(names)]
        (root / f"{split}.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    splits = load_splits(DataConfig(source="csv", path=str(root), val_fraction=0.34))
    assert splits.class_names == ["0", "1"] and len(splits.test) == 6
    assert len(splits.train) + len(splits.val) == 6
    x, _ = first_batch(splits.test)
    assert x.shape[1:] == (32, 32, 3)
    (root / "test.csv").write_text("filename,label\nghost.png,1\n")
    with pytest.raises(KDError, match="ghost.png"):
        load_splits(DataConfig(source="csv", path=str(root)))


def test_cifar10_local_batches_with_class_subset(tmp_path):
    write_cifar_batches(tmp_path / "cifar")
    cfg = DataConfig(source="cifar10", path=str(tmp_path / "cifar"),
                     classes=["airplane", "automobile", "bird"])  # fmt: skip
    splits = load_splits(cfg)
    assert splits.class_names == ["airplane", "automobile", "bird"]
    assert len(splits.test) == 9 and set(splits.test.labels) == {0, 1, 2}
    assert len(splits.train) + len(splits.val) == 45
    with pytest.raises(KDError, match="python batches not found"):
        load_splits(DataConfig(source="cifar10", path=str(tmp_path / "nothing")))
    with pytest.raises(KDError, match="unknown CIFAR-10 classes"):
        load_splits(DataConfig(source="cifar10", path=str(tmp_path / "cifar"), classes=["cow"]))


def test_augmentation_changes_training_batches_only(tiny_npz):
    split = load_splits(DataConfig(path=str(tiny_npz))).test
    a, _ = first_batch(split)
    b, _ = first_batch(split)
    np.testing.assert_array_equal(a, b)
    aug, _ = first_batch(split, training=True, augment=AugmentConfig(), seed=3)
    assert not np.array_equal(np.sort(a.ravel()), np.sort(aug.ravel()))


def test_the_run_seed_reaches_every_augmentation(tiny_npz):
    """Same seed, same augmented batches (crop, flip, colour); another seed, other batches."""
    split = load_splits(DataConfig(path=str(tiny_npz))).test
    aug = AugmentConfig(random_resized_crop=True, horizontal_flip=True, color_jitter=0.3)
    a, _ = first_batch(split, training=True, augment=aug, seed=7)
    b, _ = first_batch(split, training=True, augment=aug, seed=7)
    c, _ = first_batch(split, training=True, augment=aug, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    steps = training_steps(len(split), 8)
    ds = make_dataset(split, 32, 8, training=True, augment=aug, seed=7, epochs=3)
    stream = [x.numpy() for x, _ in ds.take(3 * steps)]
    epoch1, epoch2 = stream[0], stream[steps]
    np.testing.assert_array_equal(epoch1, a)
    assert not np.array_equal(epoch1, epoch2), "every epoch draws new augmentations"
    resumed = make_dataset(split, 32, 8, training=True, augment=aug, seed=7, first_epoch=1,
                           epochs=3)  # fmt: skip
    for k, (x, _) in enumerate(resumed.take(2 * steps)):
        np.testing.assert_array_equal(x.numpy(), stream[steps + k], err_msg="resumed stream")


def _bug(exc_type):
    def raise_bug(*args, **kwargs):
        raise exc_type("bug")

    return raise_bug


def test_failed_downloads_are_user_errors_and_bugs_keep_their_type(tmp_path, monkeypatch):
    import keras

    monkeypatch.delenv("KD_KERAS_DATA_DIR", raising=False)
    monkeypatch.setattr(keras.utils, "get_file", url_fetch_failure)
    with pytest.raises(KDError, match="could not download pneumoniamnist.npz .URL fetch failure"):
        resolve_medmnist_path("pneumoniamnist", 28, None)
    monkeypatch.setattr(keras.utils, "get_file", _bug(ValueError))  # a file failing its md5
    with pytest.raises(KDError, match="could not download pneumoniamnist.npz .bug"):
        resolve_medmnist_path("pneumoniamnist", 28, None)
    monkeypatch.setattr(keras.utils, "get_file", _bug(TypeError))
    with pytest.raises(TypeError, match="bug"):
        resolve_medmnist_path("pneumoniamnist", 28, None)

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", url_fetch_failure)
    with pytest.raises(KDError, match="could not download CIFAR-10"):
        load_splits(DataConfig(source="cifar10"))
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", _bug(TypeError))
    with pytest.raises(TypeError, match="bug"):
        load_splits(DataConfig(source="cifar10"))


def test_cifar_batches_of_another_layout_are_user_errors_and_bugs_keep_their_type(
    tmp_path, monkeypatch
):
    import pickle

    import kd_keras.data.sources

    folder = write_cifar_batches(tmp_path / "cifar")
    batch = folder / "data_batch_2"
    for content in ([1, 2, 3], {b"data": np.zeros((2, 5)), b"labels": [0, 1]}):
        batch.write_bytes(pickle.dumps(content))
        with pytest.raises(KDError, match="CIFAR-10 batch .*data_batch_2 is not readable"):
            load_splits(DataConfig(source="cifar10", path=str(folder)))
    monkeypatch.setattr(kd_keras.data.sources.pickle, "load", _bug(AssertionError))
    with pytest.raises(AssertionError, match="bug"):
        load_splits(DataConfig(source="cifar10", path=str(folder)))
