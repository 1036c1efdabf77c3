"""Every file under a dataset folder is used, reported with a short reason, or hidden: ignored."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insect_exp.data.pipeline import load
from insect_exp.data.scan import diagnose, scan
from tests.conftest import make_image_folder

NOBODY = 65534


def _image_bytes(fmt: str, mode: str = "RGB", **save_args) -> bytes:
    """A small valid image in FMT, as bytes."""
    rgb = np.random.default_rng(2).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format=fmt, **save_args)
    return buf.getvalue()


def _corrupt_jpeg() -> bytes:
    good = _image_bytes("JPEG")
    return good[:2] + bytes(40) + good[42:]  # starts and ends like a JPEG, headers zeroed


def _corrupt_png() -> bytes:
    good = _image_bytes("PNG")
    return good[:16] + bytes(17) + good[33:]  # PNG signature, IHDR zeroed, IEND intact


# An ISO-BMFF "ftyp" box as HEIC and AVIF files start with; the rest does not matter here.
_HEIC_HEAD = b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heicmiaf" + bytes(200)
_AVIF_HEAD = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(200)


def _write(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def _symlink_to(target: str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


# name in the class folder, how to make it, the exact reason it is skipped with
BAD_FILES = {
    "truncated jpeg": (
        "cut.jpg",
        _write(_image_bytes("JPEG")[:700]),
        "truncated",
    ),
    "truncated png": ("cut.png", _write(_image_bytes("PNG")[:-1]), "truncated"),
    "corrupt jpeg": ("broken.jpg", _write(_corrupt_jpeg()), "corrupt JPEG"),
    "corrupt png": ("broken.png", _write(_corrupt_png()), "corrupt PNG"),
    "text named .jpg": ("text.jpg", _write(b"collected in the garden\n"), "not an image"),
    "zeros named .png": ("zeros.png", _write(bytes(100)), "not an image"),
    "html named .jpg": ("page.jpg", _write(b"<!DOCTYPE html><p>404</p>"), "not an image"),
    "empty .jpg": ("empty.jpg", _write(b""), "empty file"),
    "text file": ("notes.txt", _write(b"beetle, oak, 12 May"), "not an image file"),
    "truncated webp": ("cut.webp", _write(_image_bytes("WEBP")[:-4]), "truncated"),
    "tiff": ("scan.tif", _write(_image_bytes("TIFF")), "unsupported format (tiff)"),
    "tiff named .jpg": ("scan.jpg", _write(_image_bytes("TIFF")), "unsupported format (tiff)"),
    "heic named .jpg": ("iphone.jpg", _write(_HEIC_HEAD), "unsupported format (heic)"),
    "avif named .jpg": ("web.jpg", _write(_AVIF_HEAD), "unsupported format (avif)"),
    "ppm named .png": ("netpbm.png", _write(_image_bytes("PPM")), "unsupported format (ppm)"),
    "1-bit bmp": ("mono.bmp", _write(_image_bytes("BMP", mode="1")), "unsupported BMP variant"),
    "fifo": ("pipe.jpg", os.mkfifo, "not a file"),
    "dangling symlink": ("gone.jpg", _symlink_to("nowhere.jpg"), "dangling symlink"),
    "symlink loop": ("loop.jpg", _symlink_to("loop.jpg"), "symlink loop"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_bad_file_is_skipped_with_a_reason_that_says_what_is_wrong(tmp_path, kind):
    # Given a folder of good images and one bad file in a class
    root = make_image_folder(tmp_path / "insects", train_per_class=3, test_per_class=1)
    name, make, reason = BAD_FILES[kind]
    bad = root / "train" / "beetles" / name
    make(bad)

    # When it is scanned and decoded
    data = load(scan(root), (8, 8), seed=0)

    # Then exactly that file is skipped, with exactly its reason, and every good image is used
    assert data.skipped == [(str(bad), reason)]
    assert len(data.train) == 9 and len(data.test) == 3


def test_truncated_images_of_every_readable_format_read_as_truncated(tmp_path):
    # Given images of every format TensorFlow reads, cut short at several points
    root = make_image_folder(tmp_path / "insects", train_per_class=2, test_per_class=1)
    folder = root / "train" / "cockroach"
    formats = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "webp": "WEBP"}
    for ext, fmt in formats.items():
        good = _image_bytes(fmt, mode="P" if fmt == "GIF" else "RGB")
        for keep in (0.05, 0.5, 0.95):
            (folder / f"{ext}_{keep}.jpg").write_bytes(good[: int(len(good) * keep)])
        (folder / f"{ext}_lacks_2_bytes.jpg").write_bytes(good[:-2])

    # When they are decoded
    data = load(scan(root), (8, 8), seed=0)

    # Then each one is skipped as truncated
    assert len(data.skipped) == 20
    assert {reason for _, reason in data.skipped} == {"truncated"}


def test_a_file_gone_since_the_scan_is_reported_as_not_found(tmp_path):
    root = make_image_folder(tmp_path / "insects", train_per_class=2, test_per_class=1)
    gone = root / "train" / "beetles" / "moved.jpg"
    shutil.copy(root / "train" / "beetles" / "beetles_0.jpg", gone)
    manifest = scan(root)
    gone.unlink()

    data = load(manifest, (8, 8), seed=0)

    assert data.skipped == [(str(gone), "file not found")]


@contextmanager
def _without_root_powers() -> Iterator[None]:
    """Run the block as user nobody when running as root, so file permissions apply as to anyone.

    Root reads files whatever their mode: only a process without root's powers sees chmod 000 the
    way a user does. The effective ids are switched (all threads, through glibc) and restored.
    """
    if os.geteuid() != 0:
        yield
        return
    try:
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
    except PermissionError:
        os.setegid(0)
        pytest.skip("running as root without the right to switch to another user")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """A temporary folder every user may enter (pytest's own are private to their owner)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="insect_exp_test_"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_unreadable_file_and_folder_are_reported_as_permission_denied(open_tmp_path):
    # Given a class with a file no one may read and a subfolder no one may list (chmod 000)
    root = make_image_folder(open_tmp_path / "insects", train_per_class=3, test_per_class=1)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    beetles = root / "train" / "beetles"
    secret = beetles / "secret.jpg"
    shutil.copy(beetles / "beetles_0.jpg", secret)
    locked = beetles / "locked"
    locked.mkdir()
    shutil.copy(beetles / "beetles_0.jpg", locked / "inside.jpg")
    secret.chmod(0)
    locked.chmod(0)

    # When a user (not root, who reads anything) scans and decodes it
    with _without_root_powers():
        data = load(scan(root), (8, 8), seed=0)

    # Then both are reported as such, and everything else is used
    assert sorted(data.skipped) == [
        (str(locked), "permission denied"),
        (str(secret), "permission denied"),
    ]
    assert len(data.train) == 9


def test_unreadable_file_is_diagnosed_as_permission_denied(open_tmp_path):
    # Given a JPEG no one may read
    secret = open_tmp_path / "secret.jpg"
    secret.write_bytes(_image_bytes("JPEG"))
    secret.chmod(0)

    # When a user (not root) asks why it failed to decode, Then it is the permission
    with _without_root_powers():
        assert diagnose(secret) == "permission denied"


def test_files_directly_in_a_split_are_reported_not_in_a_class_folder(tmp_path):
    # Given a plain image file and a dangling symlink directly in train/ and test/
    root = make_image_folder(tmp_path / "insects", train_per_class=2, test_per_class=1)
    shutil.copy(root / "train" / "beetles" / "beetles_0.jpg", root / "train" / "stray.jpg")
    (root / "test" / "README.txt").write_text("photos from May")
    (root / "test" / "old.jpg").symlink_to(tmp_path / "gone.jpg")

    # When it is scanned
    manifest = scan(root)

    # Then each is reported, and classes and images are what the class folders hold
    assert manifest.skipped == [
        (str(root / "train" / "stray.jpg"), "not in a class folder"),
        (str(root / "test" / "README.txt"), "not in a class folder"),
        (str(root / "test" / "old.jpg"), "dangling symlink"),
    ]
    assert manifest.class_names == ["beetles", "cockroach", "dragonflies"]
    assert len(manifest.train) == 6 and len(manifest.test) == 3


def test_hidden_files_and_folders_are_ignored_at_every_depth(tmp_path):
    # Given hidden names at every level: in the split, as a class, inside a class, as files
    root = make_image_folder(tmp_path / "insects", train_per_class=2, test_per_class=1)
    good = (root / "train" / "beetles" / "beetles_0.jpg").read_bytes()
    beetles = root / "train" / "beetles"
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / ".hidden_class").mkdir()
    (root / "train" / ".hidden_class" / "x.jpg").write_bytes(good)
    (beetles / ".thumbnails").mkdir()
    (beetles / ".thumbnails" / "beetles_0.jpg").write_bytes(good)
    (beetles / ".thumbnails" / "broken.jpg").write_bytes(b"not an image")
    (beetles / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (beetles / "._beetles_0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (beetles / ".hidden.jpg").write_bytes(good)
    (root / "test" / "beetles" / ".gone.jpg").symlink_to(tmp_path / "nowhere.jpg")

    # When it is scanned and decoded
    data = load(scan(root), (8, 8), seed=0)

    # Then none of them is used or reported, and nothing else changes
    assert data.class_names == ["beetles", "cockroach", "dragonflies"]
    assert data.skipped == []
    assert len(data.train) == 6 and len(data.test) == 3
    assert not any("/." in p for p in data.train.paths + data.test.paths)


def test_symlinks_to_images_and_folders_are_used_and_loops_reported(tmp_path):
    # Given a class holding a symlink to an image, one to a folder of images, and one to itself
    root = make_image_folder(tmp_path / "insects", train_per_class=2, test_per_class=1)
    elsewhere = make_image_folder(tmp_path / "elsewhere", train_per_class=2, test_per_class=0)
    beetles = root / "train" / "beetles"
    (beetles / "linked.jpg").symlink_to(elsewhere / "train" / "beetles" / "beetles_0.jpg")
    (beetles / "more").symlink_to(elsewhere / "train" / "beetles", target_is_directory=True)
    (beetles / "again").symlink_to(".", target_is_directory=True)

    # When it is scanned and decoded
    data = load(scan(root), (8, 8), seed=0)

    # Then the linked image and folder are used, the loop is reported once, not followed
    assert data.skipped == [(str(beetles / "again"), "symlink loop")]
    assert sorted(Path(p).relative_to(beetles).as_posix() for p in data.train.paths[:5]) == [
        "beetles_0.jpg",
        "beetles_1.jpg",
        "linked.jpg",
        "more/beetles_0.jpg",
        "more/beetles_1.jpg",
    ]
    assert len(data.train) == 5 + 4


def _visible_leaves(split_dir: Path) -> set[str]:
    """Every path under SPLIT_DIR that is not a real folder, not hidden, not under a hidden name."""
    leaves = set()
    for dirpath, dirnames, filenames in os.walk(split_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        leaves |= {os.path.join(dirpath, f) for f in filenames if not f.startswith(".")}
    return leaves


def test_every_visible_file_is_either_used_or_reported(tmp_path):
    # Given a folder mixing every kind of file, good and bad, visible and hidden, at several depths
    root = make_image_folder(tmp_path / "insects", train_per_class=4, test_per_class=2)
    for i, (kind, (name, make, _)) in enumerate(BAD_FILES.items()):
        split = "test" if i % 3 == 0 else "train"
        folder = root / split / ["beetles", "cockroach", "dragonflies"][i % 3]
        if i % 2:
            folder = folder / f"sub_{i}"
            folder.mkdir(exist_ok=True)
        make(folder / name)
        if kind == "text file":
            (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    good = (root / "train" / "beetles" / "beetles_0.jpg").read_bytes()
    (root / "train" / "cockroach" / "deep" / "deeper").mkdir(parents=True)
    (root / "train" / "cockroach" / "deep" / "deeper" / "ok.jpg").write_bytes(good)
    (root / "train" / "cockroach" / "deep" / ".cache").mkdir()
    (root / "train" / "cockroach" / "deep" / ".cache" / "ok.jpg").write_bytes(good)
    (root / "train" / "stray.png").write_bytes(good)
    (root / "test" / ".hidden_class").mkdir()
    (root / "test" / ".hidden_class" / "x.jpg").write_bytes(good)

    # When it is scanned and decoded
    data = load(scan(root), (8, 8), seed=0)

    # Then every visible file is in exactly one of: the decoded images, the skipped list
    used = data.train.paths + data.test.paths
    skipped = [path for path, _ in data.skipped]
    assert len(set(used)) == len(used) and len(set(skipped)) == len(skipped)
    assert not set(used) & set(skipped)
    visible = _visible_leaves(root / "train") | _visible_leaves(root / "test")
    assert set(used) | set(skipped) == visible
    assert len(used) == 3 * 4 + 3 * 2 + 1
    assert all(reason for _, reason in data.skipped)


def test_webp_images_are_used_like_any_other(tmp_path):
    # Given a WebP photo in a class folder (TensorFlow reads WebP)
    root = make_image_folder(tmp_path / "insects", train_per_class=2, test_per_class=1)
    photo = root / "train" / "beetles" / "photo.webp"
    photo.write_bytes(_image_bytes("WEBP"))

    # When the folder is decoded, then it is trained on
    data = load(scan(root), (8, 8), seed=0)
    assert str(photo) in data.train.paths and data.skipped == []
