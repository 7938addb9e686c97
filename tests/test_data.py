"""Training data: every kind of --dataset, column detection, conversions, bad images, offline errors."""

import io
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.data.columns import find_image_column
from ddpm_hf.data.decoding import BadImageError, build_image_bank, to_uint8_array
from ddpm_hf.data.sources import DatasetUnavailableError, load_image_dataset
from ddpm_hf.diffusion.pixels import to_model_range

REPO = Path(__file__).resolve().parents[1]


def test_builtin_digits_are_sklearn_digits_exactly_with_the_last_297_held_out():
    from sklearn.datasets import load_digits

    banks = {}
    for split in ("train", "test"):
        ds = load_image_dataset("digits", split=split)
        banks[split] = build_image_bank(ds, find_image_column(ds.features), channels=1, resolution=8, progress=False)
    digits = load_digits()
    expected = np.round(digits.images * 255 / 16).astype(np.uint8)
    assert banks["train"].images.shape == (1500, 1, 8, 8) and banks["test"].images.shape == (297, 1, 8, 8)
    np.testing.assert_array_equal(torch.cat([banks["train"].images, banks["test"].images])[:, 0].numpy(), expected)
    assert load_image_dataset("digits")["label"] == digits.target[:1500].tolist()  # train is the default split
    assert np.bincount(load_image_dataset("digits", split="test")["label"]).min() >= 27  # every digit held out
    with pytest.raises(DatasetUnavailableError, match=r"--dataset digits has the splits train and test .*not 'valid'"):
        load_image_dataset("digits", split="valid")


def test_image_column_detection():
    feats = lambda **cols: datasets.Features(cols)
    img, lab = datasets.Image(), datasets.Value("int64")
    assert find_image_column(feats(img=img, label=lab)) == "img"
    assert find_image_column(feats(image=img, label=lab)) == "image"
    assert find_image_column(feats(picture=img, label=lab)) == "picture"
    assert find_image_column(feats(a=img, b=img), requested="b") == "b"
    with pytest.raises(ValueError, match=r"Cannot tell which column holds the images .* name it with --image_column"):
        find_image_column(feats(a=img, b=img))
    with pytest.raises(ValueError, match=r"--image_column 'pic' is not a column of this dataset; its columns are \['img', 'label'\]"):
        find_image_column(feats(img=img, label=lab), requested="pic")


def test_conversions_to_channels_and_size():
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # fully transparent red
    out = to_uint8_array(rgba, channels=3, resolution=16)
    assert out.shape == (16, 16, 3) and (out == 255).all()  # composited on white
    gray = to_uint8_array(Image.new("RGB", (30, 30), (10, 200, 30)), channels=1, resolution=8)
    assert gray.shape == (8, 8, 1) and abs(int(gray[0, 0, 0]) - round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)) <= 1
    rgb = to_uint8_array(Image.new("L", (8, 8), 77), channels=3, resolution=8)
    assert rgb.shape == (8, 8, 3) and (rgb == 77).all()
    # center crop keeps the middle of a wide image
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255
    crop = to_uint8_array(Image.fromarray(wide), channels=1, resolution=10)
    assert (crop == 255).all()
    with pytest.raises(ValueError, match=r"--channels=2 is not supported"):
        to_uint8_array(Image.new("L", (8, 8)), channels=2, resolution=8)


def test_to_model_range_and_flips():
    batch = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2).repeat(64, 1, 1, 1)
    x = to_model_range(batch, random_flip=False)
    assert x[0].flatten().tolist() == [-1.0, 1.0]
    flipped = to_model_range(batch, random_flip=True, generator=torch.Generator().manual_seed(0))
    n_flipped = int((flipped[:, 0, 0, 0] == 1.0).sum())
    assert 16 < n_flipped < 48  # about half
    assert torch.equal(flipped, to_model_range(batch, random_flip=True, generator=torch.Generator().manual_seed(0)))


def make_image_folder(root: Path, n=6, corrupt=False):
    for i in range(n):
        sub = root / ("a" if i % 2 else "b") / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(sub / f"img{i}.png")
    if corrupt:
        (root / "b" / "deeper" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def test_local_image_folder_is_read_recursively(tmp_path):
    make_image_folder(tmp_path / "imgs")
    ds = load_image_dataset(str(tmp_path / "imgs"))
    bank = build_image_bank(ds, find_image_column(ds.features), channels=3, resolution=8, progress=False)
    assert bank.images.shape == (6, 3, 8, 8)
    assert sorted(bank.images[:, 0, 0, 0].tolist()) == [0, 40, 80, 120, 160, 200]


def test_bad_image_stops_naming_the_file_or_is_skipped_and_counted(tmp_path):
    make_image_folder(tmp_path / "imgs", corrupt=True)
    ds = load_image_dataset(str(tmp_path / "imgs"))
    column = find_image_column(ds.features)
    with pytest.raises(BadImageError, match=r"image \d+ \(.*broken\.png\): cannot decode image .* pass --on_bad_image skip"):
        build_image_bank(ds, column, channels=3, resolution=8, progress=False)
    bank = build_image_bank(ds, column, channels=3, resolution=8, on_bad_image="skip", progress=False)
    assert len(bank) == 6 and bank.skipped == 1


def test_local_parquet_with_bytes_images(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (4, 4), 9).save(buf, format="PNG")
    ds = datasets.Dataset.from_dict({"pixels": [{"bytes": buf.getvalue(), "path": None}] * 3},
                                    features=datasets.Features({"pixels": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "part.parquet"))
    loaded = load_image_dataset(str(tmp_path / "part.parquet"))
    bank = build_image_bank(loaded, find_image_column(loaded.features), channels=1, resolution=4, progress=False)
    assert bank.images.shape == (3, 1, 4, 4) and (bank.images == 9).all()


def test_cifar10_parquet_like_the_hub(shared_dir):
    ds = load_image_dataset(str(shared_dir / "data" / "cifar10" / "test.parquet"))
    assert len(ds) == 10_000 and find_image_column(ds.features) == "img"
    bank = build_image_bank(ds.select(range(256)), "img", channels=3, resolution=32, progress=False)
    assert bank.images.shape == (256, 3, 32, 32)
    first = np.asarray(ds[0]["img"].convert("RGB"))
    np.testing.assert_array_equal(bank.images[0].permute(1, 2, 0).numpy(), first)


def test_mnist_parquet_like_the_hub(shared_dir):
    files = {"train": str(shared_dir / "data" / "mnist" / "train.parquet")}
    ds = load_image_dataset(files["train"])
    assert len(ds) == 60_000 and find_image_column(ds.features) == "image"
    bank = build_image_bank(ds.select(range(100)), "image", channels=1, resolution=28, progress=False)
    assert bank.images.shape == (100, 1, 28, 28)
    # exact statistics of known data: MNIST pixels are byte-exact, so image 0 (a 5) decodes to the same bytes
    np.testing.assert_array_equal(bank.images[0, 0].numpy(), np.asarray(ds[0]["image"]))
    assert ds[0]["label"] == 5


@pytest.mark.slow
def test_uncached_hub_dataset_fails_at_once_offline(tmp_path):
    code = "from ddpm_hf.data.sources import load_image_dataset; load_image_dataset('someone/not-cached-anywhere')"
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "DatasetUnavailableError: Cannot load the Hub dataset 'someone/not-cached-anywhere'" in proc.stderr
    assert "Point --dataset at local files" in proc.stderr


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetUnavailableError, match=r"holds no images"):
        load_image_dataset(str(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and copies to a GPU need CUDA")
@pytest.mark.parametrize("on_gpu", [True, False], ids=["bank on the GPU", "bank in pinned host memory"])
def test_a_gpu_run_gets_the_cpu_runs_batches_on_the_gpu(monkeypatch, on_gpu):
    from ddpm_hf.training import batches as data
    from ddpm_hf.recipes.resolve import resolve_config

    monkeypatch.setattr(data, "_fits_on", lambda device, nbytes: on_gpu)
    config = resolve_config(dict(dataset="digits", max_train_samples=40, channels=1, resolution=8, batch_size=8,
                                 output_dir="unused"))
    cpu = data.BatchSource(config, 4, 0, 1, progress=False, device=torch.device("cpu"))
    gpu = data.BatchSource(config, 4, 0, 1, progress=False, device=torch.device("cuda"))
    assert gpu.bank.images.is_cuda == on_gpu
    for step in range(12):  # past an epoch boundary (5 steps of 8 images)
        batch = gpu.get(step, 0)
        assert batch.is_cuda and torch.equal(batch.cpu(), cpu.get(step, 0))
