"""Shared test helpers: tiny datasets written in the real on-disk formats, and the CLI as a
subprocess.

- ``write_idx_dataset``: MNIST / Fashion-MNIST as gzipped IDX files (big-endian magic 2051 for
  images, 2049 for labels, then big-endian dims, then uint8 data), the files LeCun's and
  Zalando's sites serve.
- ``write_cifar_dataset``: CIFAR-10 / CIFAR-100 "python version" batches. The real files are
  Python 2 pickles whose keys and raw array bytes are py2 ``str``: loaded with
  ``encoding="bytes"`` (the CIFAR site's recipe) they give ``b'data'`` (uint8 N x 3072, the
  R, G, B planes of each 32x32 image row-major) and ``b'labels'``; torchvision loads them with
  ``encoding="latin1"`` and sees ``'data'``. We write exactly that: a protocol-2 pickle whose
  bytes are emitted as py2 strings.
- ``write_svhn_dataset``: SVHN's cropped digits, ``train_32x32.mat`` and ``test_32x32.mat``:
  MATLAB 5 files (what ``scipy.io.savemat`` writes and the real ones are) holding ``X``, uint8
  32 x 32 x 3 x N (the image index last), and ``y``, uint8 N x 1 with 1..9 for those digits
  and 10 for the digit 0.

All are learnable: each class has its own mean pattern, each image adds noise, so a tiny
model gets well above chance in an epoch or two. Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

IDX_FOLDERS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def class_images(n: int, num_classes: int, shape: tuple[int, ...], seed: int,
                 noise: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images of ``shape``, int labels): a fixed random pattern per class plus noise.

    The class patterns depend only on ``seed`` (not on n), so a train and a test split written
    with the same seed share them; labels cycle through the classes so every class appears.
    """
    patterns = np.random.default_rng(seed).uniform(30, 225, size=(num_classes, *shape))
    rng = np.random.default_rng([seed, n, num_classes])
    labels = rng.permutation(np.arange(n) % num_classes)
    images = patterns[labels] + rng.normal(0, noise, size=(n, *shape))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels.astype(np.int64)


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX: 0x00 0x00, type 0x08 (uint8), ndim; each dim as a big-endian int32; the data."""
    magic = 0x0800 | array.ndim  # 2051 for N x 28 x 28 images, 2049 for N labels
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_dataset(root: Path, name: str = "fashion_mnist", n_train: int = 256,
                      n_test: int = 128, seed: int = 0, folder: Path | None = None) -> Path:
    """Write the four gzipped IDX files of MNIST/Fashion-MNIST; return ``root`` (a data_dir).

    They go where torchvision and the DataModule look: ``root/<Class>/raw/*.gz`` (FashionMNIST
    or MNIST), or into ``folder`` when given (e.g. a stand-in for a system dataset dir).
    """
    root = Path(root)
    target = Path(folder) if folder is not None else root / IDX_FOLDERS[name] / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images, labels = class_images(count, 10, (28, 28), seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with gzip.open(target / f"{prefix}-{kind}-ubyte.gz", "wb") as handle:
                handle.write(_idx_bytes(array))
    return root


class _Py2Pickler(pickle._Pickler):
    """A protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING /
    BINSTRING), as the real CIFAR batches (pickled by Python 2's cPickle) hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _py2_pickle(path: Path, obj) -> None:
    def to_py2(value):  # the real files' keys and label names are py2 str: bytes here
        if isinstance(value, str):
            return value.encode("latin1")
        if isinstance(value, dict):
            return {to_py2(k): to_py2(v) for k, v in value.items()}
        if isinstance(value, list):
            return [to_py2(v) for v in value]
        return value

    with open(path, "wb") as handle:
        _Py2Pickler(handle, protocol=2).dump(to_py2(obj))


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 (HWC) -> N x 3072 in the CIFAR layout: 1024 R, then G, then B."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_cifar_dataset(root: Path, name: str = "cifar10", n_train: int = 100,
                        n_test: int = 50, seed: int = 0) -> Path:
    """Write CIFAR-10 (``cifar-10-batches-py``: data_batch_1..5, test_batch, batches.meta) or
    CIFAR-100 (``cifar-100-python``: train, test, meta); return ``root`` (a data_dir).

    The files are in the real format but not the real contents, so torchvision's md5 check
    fails on them: tests that load them use the ``allow_unverified_cifar`` fixture.
    """
    root = Path(root)
    num_classes = {"cifar10": 10, "cifar100": 100}[name]
    train_x, train_y = class_images(n_train, num_classes, (32, 32, 3), seed)
    test_x, test_y = class_images(n_test, num_classes, (32, 32, 3), seed)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        parts = np.array_split(np.arange(n_train), 5)
        for number, part in enumerate(parts, start=1):
            _py2_pickle(folder / f"data_batch_{number}", {
                "batch_label": f"training batch {number} of 5",
                "labels": train_y[part].tolist(), "data": cifar_rows(train_x[part]),
                "filenames": [f"train_{i}.png" for i in part]})
        _py2_pickle(folder / "test_batch", {
            "batch_label": "testing batch 1 of 1", "labels": test_y.tolist(),
            "data": cifar_rows(test_x), "filenames": [f"test_{i}.png" for i in range(n_test)]})
        _py2_pickle(folder / "batches.meta", {
            "num_cases_per_batch": len(parts[0]), "label_names": CIFAR10_NAMES,
            "num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            _py2_pickle(folder / split, {
                "batch_label": f"{split}ing batch 1 of 1", "fine_labels": y.tolist(),
                "coarse_labels": (y // 5).tolist(), "data": cifar_rows(x),
                "filenames": [f"{split}_{i}.png" for i in range(len(y))]})
        _py2_pickle(folder / "meta", {
            "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]})
    return root


def write_svhn_dataset(root: Path, n_train: int = 100, n_test: int = 50, seed: int = 0) -> Path:
    """Write ``train_32x32.mat`` and ``test_32x32.mat`` into ``root`` (a data_dir, where
    torchvision's SVHN looks); return ``root``. The digit labels of image i are
    ``class_images(n, 10, (32, 32, 3), seed)[1]``, stored with 10 for the digit 0.

    Real format, not the real contents: torchvision's md5 check fails on them, so tests that
    load them use the ``allow_unverified_svhn`` fixture.
    """
    from scipy.io import savemat

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("test", n_test)):
        images, digits = class_images(count, 10, (32, 32, 3), seed)
        labels = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        savemat(root / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": labels})
    return root


def assert_interleaves(whole, ranks) -> None:
    """Rank r's batch k is positions r, r + N, ... of the 1-rank batch k (same images, same
    augmentation); the last batch loses its len % N tail so the ranks stay equal."""
    whole, ranks = list(whole), [list(loader) for loader in ranks]
    world = len(ranks)
    for batches in ranks:
        assert len(batches) == len(whole)
    for k, (images, labels) in enumerate(whole):
        keep = len(labels) // world * world
        for rank, batches in enumerate(ranks):
            assert torch.equal(batches[k][0], images[:keep][rank::world])
            assert torch.equal(batches[k][1], labels[:keep][rank::world])


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_cuda(why): skipped, with why, where torch sees no CUDA device")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.requires_cuda("why")`` skips with "needs a CUDA device: why" on a
    machine without one (a CPU-only CI), so every CUDA case is listed as skipped there."""
    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("requires_cuda")
        if marker is not None:
            why = marker.args[0] if marker.args else "torch.cuda.is_available() is false"
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA device: {why}"))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run torch on one intra-op thread (and run_cli's subprocesses too).

    On 2 shared cores, 2 OpenMP threads competing with other processes spin-wait: a tiny
    ResNet20 fit measured 6-29 s with 2 threads against 1.1 s with 1. Results do not depend
    on it (the seeded tests compare runs made with the same setting).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_fmnist(tmp_path) -> Path:
    """A data_dir holding a tiny Fashion-MNIST (256 train, 128 test) as gzipped IDX files."""
    return write_idx_dataset(tmp_path / "data", "fashion_mnist")


@pytest.fixture
def allow_unverified_cifar(monkeypatch):
    """Let torchvision's CIFAR classes read our test-written batches (tests only).

    torchvision checks every CIFAR file against the md5 of the real download, in
    ``CIFAR10._check_integrity`` (the batches) and in ``_load_meta`` (the meta file), both
    through ``torchvision.datasets.cifar.check_integrity``. That check is patched - in
    torchvision's module, never in ours - to only ask that the file exists, so a missing file
    is still reported as missing.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def allow_unverified_svhn(monkeypatch):
    """Let torchvision's SVHN read our test-written .mat files (tests only): its
    ``_check_integrity`` compares each file with the real download's md5 through
    ``torchvision.datasets.svhn.check_integrity``, patched here (in torchvision's module) to
    only ask that the file exists, so a missing file is still reported as missing."""
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_svhn, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


def run_cli(*args, cwd, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """``python -m lightning_lth *args`` in a subprocess (W&B offline, fixed hash seed, one
    torch thread as in the tests themselves); ``env`` adds or overrides variables."""
    environ = dict(os.environ, WANDB_MODE="offline", PYTHONHASHSEED="0", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                            os.environ.get("PYTHONPATH")])))
    environ.pop("WANDB_SERVICE", None)  # a W&B service this process started is its own
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "lightning_lth", *map(str, args)], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=timeout)
