"""The data audit: planted exact and near duplicates across splits are found, and only they."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import imagehash
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from insect_exp.config import CacheMode, FolderDatasetConfig
from insect_exp.data import load_data
from insect_exp.data.audit import audit_data, split_hashes
from insect_exp.data.cache import CachePolicy
from insect_exp.data.duplicates import close_pairs, hash_thumbnails
from insect_exp.data.pipeline import load
from insect_exp.data.scan import DatasetError, scan
from tests.conftest import make_image_folder, run_cli
from tests.sweeps import TINY

SIZE = (32, 32)
CLASSES = ("ants", "bees")


def _picture(seed: int, size: int = 128) -> Image.Image:
    """A distinct image: a smooth random background, random shapes and noise, all from SEED."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, size - size // 4, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + w, y + h], fill=colour)
    pixels = np.asarray(image, np.int16) + rng.integers(-20, 20, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _shifted(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """IMAGE moved right and down by dx, dy pixels, its edge rows and columns repeated."""
    pixels = np.pad(np.asarray(image), ((dy, 0), (dx, 0), (0, 0)), mode="edge")
    return Image.fromarray(pixels[: image.height, : image.width])


def _recompressed(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def planted_folder(root: Path) -> tuple[Path, set[tuple[str, str, str]]]:
    """A 2-class folder of distinct images (4 train, 3 test a class) with planted twins.

    Returns:
        The folder, and the planted pairs: (train file, other file, kind), paths under root.
    """
    seed = 0
    for split, count in (("train", 4), ("test", 3)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                seed += 1
                _picture(seed).save(root / split / name / f"{i}.jpg", quality=90)
    t = root / "train"
    shutil.copy(t / "ants" / "0.jpg", t / "ants" / "copy.jpg")
    shutil.copy(t / "ants" / "1.jpg", root / "test" / "ants" / "copy.jpg")
    with Image.open(t / "ants" / "2.jpg") as image:
        image.resize((96, 96), Image.BICUBIC).save(root / "test/ants/resized.jpg", quality=90)
    with Image.open(t / "bees" / "0.jpg") as image:
        _recompressed(image, 40).save(root / "test/bees/recompressed.png")
    with Image.open(t / "bees" / "1.jpg") as image:
        _shifted(image, 2, 1).save(root / "test/bees/shifted.jpg", quality=90)
    planted = {
        ("train/ants/0.jpg", "train/ants/copy.jpg", "exact"),
        ("train/ants/1.jpg", "test/ants/copy.jpg", "exact"),
        ("train/ants/2.jpg", "test/ants/resized.jpg", "near"),
        ("train/bees/0.jpg", "test/bees/recompressed.png", "near"),
        ("train/bees/1.jpg", "test/bees/shifted.jpg", "near"),
    }
    return root, planted


def _found(rows, root: Path) -> set[tuple[str, str, str]]:
    """The audit's pairs as (train file, other file, kind), paths under root."""
    found = set()
    for a, split_a, b, split_b, kind, _ in rows:
        pair = sorted([(split_a != "train", str(Path(a).relative_to(root))),
                       (split_b != "train", str(Path(b).relative_to(root)))])  # fmt: skip
        found.add((pair[0][1], pair[1][1], kind))
    return found


def test_planted_exact_and_near_duplicates_are_found_and_no_other_pairs(tmp_path):
    # Given a folder of distinct images with planted copies: exact, resized, recompressed, shifted
    root, planted = planted_folder(tmp_path / "insects")
    loaded = load(scan(root), SIZE)
    # When it is audited, at the default distance and at one loose enough to bring distinct
    # images' hashes within reach (their thumbnails then tell them apart)
    data = audit_data(loaded, FolderDatasetConfig(root=str(root)), None)
    loose = audit_data(loaded, FolderDatasetConfig(root=str(root), duplicate_distance=24), None)
    # Then exactly the planted pairs are reported, each of its kind, either way
    assert _found(data.audit.rows, root) == _found(loose.audit.rows, root) == planted
    assert data.audit.counts == {
        "duplicates_within_train": 2, "duplicates_train_test": 4, "duplicates_within_test": 0,
    }  # fmt: skip
    # And the test images with a twin in train are the four planted ones, none dropped
    twins = {Path(data.test.paths[i]).name for i in data.audit.test_twins}
    assert twins == {"copy.jpg", "resized.jpg", "recompressed.png", "shifted.jpg"}
    assert len(data.test) == 10 and data.audit.dropped == 0
    # And the original sizes are the files' own
    sizes = data.audit.size_summary()["test"]
    assert (sizes["width_min"], sizes["width_max"], sizes["images"]) == (96, 128, 10)


def test_a_rerun_on_the_disk_cache_reuses_the_audit_and_a_damaged_one_is_redone(tmp_path, caplog):
    # Given a planted folder loaded and audited through the disk cache once
    root, planted = planted_folder(tmp_path / "insects")
    cfg = FolderDatasetConfig(root=str(root), cache=CacheMode.disk)
    policy = CachePolicy(CacheMode.disk, tmp_path / "cache", 2**26, 10**9)

    def audited():
        return audit_data(load(scan(root), SIZE, cache=policy), cfg, policy).audit

    first = audited()
    # When it runs again, and again once the kept hashes are damaged
    with caplog.at_level(logging.INFO, logger="insect_exp"):
        second = audited()
        reused = [r.message for r in caplog.records if "hashes reused" in r.message]
        caplog.clear()
        kept = max((tmp_path / "cache" / "images" / "audit").iterdir(), key=_size)  # test's
        blob = bytearray(kept.read_bytes())
        blob[3] ^= 0xFF
        kept.write_bytes(bytes(blob))
        third = audited()
    # Then the second run reuses both splits' hashes, the third computes the damaged one again
    # (from the cached images and the files' headers: the decoding did not take them), and all
    # three report the planted pairs, at the same distances, and the same original sizes
    assert len(reused) == 2
    assert sum("cannot be used" in r.message for r in caplog.records) == 1
    for audit in (first, second, third):
        assert _found(audit.rows, root) == planted
        assert audit.rows == first.rows
        assert audit.size_summary() == first.size_summary()


def test_decoding_without_the_audit_takes_no_hashes_and_its_cache_entry_serves_a_later_audit(
    tmp_path,
):
    # Given a planted folder loaded with dataset.audit=false, into memory and into the disk cache
    root, planted = planted_folder(tmp_path / "insects")

    def dataset(audit: bool, mode: CacheMode) -> FolderDatasetConfig:
        cache = str(tmp_path / "cache")
        return FolderDatasetConfig(root=str(root), audit=audit, cache=mode, cache_dir=cache)

    skipped = [
        load_data(dataset(False, mode), SIZE, 0) for mode in (CacheMode.memory, CacheMode.disk)
    ]
    # When a run with the audit on reuses the disk cache entry written without hashes
    audited = load_data(dataset(True, CacheMode.disk), SIZE, 0)
    # Then the decoding took no hashes with the audit off, and the later audit finds the planted
    # pairs (its hashes computed from the cached images)
    for data in skipped:
        assert data.audit is None and data.train.audit_inputs is None
    assert audited.storage is CacheMode.disk and audited.train.audit_inputs is None
    assert _found(audited.audit.rows, root) == planted


def test_kept_hashes_of_folders_no_longer_used_go_once_over_their_share_of_the_cap(tmp_path):
    # Given a disk cache capped so low that its kept hashes' share holds one run's at most
    policy = CachePolicy(CacheMode.disk, tmp_path / "cache", 2**26, 10**5)
    kept = tmp_path / "cache" / "images" / "audit"
    folders = [make_image_folder(tmp_path / name, seed=k) for k, name in enumerate("ab")]
    names = []
    # When one folder is audited, then another
    for root in folders:
        cfg = FolderDatasetConfig(root=str(root), cache=CacheMode.disk)
        audit_data(load(scan(root), SIZE, cache=policy), cfg, policy)
        names.append({path.name for path in kept.iterdir()})
    # Then the second run's hashes replace the first's
    assert len(names[0]) == 2 and len(names[1]) == 2 and not names[0] & names[1]


def test_dedupe_that_would_empty_the_test_split_stops_with_one_line(tmp_path):
    # Given a folder whose every test image is a copy of a train image
    root = make_image_folder(tmp_path / "insects", train_per_class=3, test_per_class=0)
    for path in sorted((root / "train").rglob("*.jpg")):
        copy = root / "test" / path.parent.name / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
    cfg = FolderDatasetConfig(root=str(root), dedupe=True)
    # When it is loaded with dataset.dedupe=true; then it stops, saying why
    with pytest.raises(DatasetError, match="every test image has a twin in train"):
        audit_data(load(scan(root), SIZE), cfg, None)


def _size(path: Path) -> int:
    return path.stat().st_size


def test_cli_run_logs_the_duplicates_warns_once_and_dedupe_drops_test_twins(tmp_path):
    # Given a planted folder, trained by the command line with dataset.dedupe=true
    root, planted = planted_folder(tmp_path / "insects")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli = run_cli(
        *TINY, f"dataset.root={root}", "dataset.dedupe=true", f"mlflow.tracking_uri={store}",
        cwd=tmp_path, env={"INSECT_EXP_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    # Then one warning line names the count and the file
    output = cli.stdout + cli.stderr
    warnings = [line for line in output.splitlines() if "have a twin in train" in line]
    assert len(warnings) == 1 and "4 test images" in warnings[0]
    assert "dataset/duplicates.tsv" in warnings[0] and "dropped" in warnings[0]
    # And the run logs the pairs, their counts, what dedupe dropped and the dataset plot
    client = MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    tsv = Path(client.download_artifacts(run.info.run_id, "dataset/duplicates.tsv", str(tmp_path)))
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["file_a", "split_a", "file_b", "split_b", "kind", "distance"]
    rows = [(*line.split("\t")[:5], 0) for line in lines[1:]]
    assert _found(rows, root) == planted
    metrics = run.data.metrics
    assert metrics["duplicates_train_test"] == 4 and metrics["duplicates_within_train"] == 2
    assert metrics["duplicates_within_test"] == 0 and metrics["dedupe_dropped_test"] == 4
    # And the test split used, as its lineage and stats say, is the six images without twins
    assert run.data.params["data.num_test"] == "6"
    assert (
        run.inputs.dataset_inputs
        and {i.dataset.name: i for i in run.inputs.dataset_inputs}[
            "insects/test"
        ].dataset.profile.find('"num_images": 6')
        >= 0
    )
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/dataset.png" in plots


def test_the_hash_of_a_32px_gray_image_is_imagehash_phash():
    # Given 32x32 gray images, the size phash takes its DCT of (no resize left to differ)
    images = np.random.default_rng(3).integers(0, 256, (20, 32, 32), dtype=np.uint8)
    # When they are hashed a batch at a time
    hashes = hash_thumbnails(images)
    # Then each hash is imagehash's phash, bit for bit
    expected = [int(str(imagehash.phash(Image.fromarray(image))), 16) for image in images]
    assert hashes.tolist() == expected


def test_the_audits_hashes_pair_the_planted_images_as_imagehash_phash_does(tmp_path):
    # Given the planted folder decoded at a size that is not a multiple of phash's 32 px
    root, _ = planted_folder(tmp_path / "insects")
    data = load(scan(root), (100, 100))
    # When each image's hash is taken as the audit takes it, and by imagehash.phash from the
    # same decoded image
    splits = {"train": data.train, "test": data.test}
    ours = np.concatenate([split_hashes(s, None, name).hashes for name, s in splits.items()])
    theirs = np.array(
        [int(str(imagehash.phash(Image.fromarray(image))), 16)
         for split in splits.values() for image in split.images],
        dtype=np.uint64,
    )  # fmt: skip
    # Then the hashes are a few bits apart at most (distinct images: about 32), and both pair
    # the same images, at the default distance and at a looser one
    assert np.bitwise_count(ours ^ theirs).max() <= 8
    for distance in (10, 16):
        pairs = [set(zip(*close_pairs(h, distance)[:2], strict=True)) for h in (ours, theirs)]
        assert pairs[0] == pairs[1] and len(pairs[0]) == 5


@pytest.mark.parametrize("distance", [-1, 65])
def test_a_duplicate_distance_out_of_range_is_refused(distance):
    with pytest.raises(Exception, match="dataset.duplicate_distance"):
        FolderDatasetConfig(root="/x", duplicate_distance=distance)
