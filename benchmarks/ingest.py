"""First ingest and steady epochs: the reference loader vs dataset.cache=memory vs disk.

Usage: python benchmarks/ingest.py [--count 20000] [--png] [--image-size 180] [--repeats 2]
                                  [--work DIR] [--verify-only] [--audit-only] [--photo-width 500]

Generates --count photo-like JPEGs of about 500x375 (4:3 at --photo-width) in 3 classes (with
--png: small 96x96 PNGs, 60,000 by default), once per work dir. Then each side runs in a fresh
process, measured whole:
- reference: tf_keras.utils.image_dataset_from_directory on the folder, iterated once;
- memory / disk: insect_exp's decode (scan, decode, resize, and for disk the cache write).
Each prints images/s and its peak RSS (best of --repeats alternating runs). Then the steady epoch
time (best of epochs 2-3) of fit.train_batches over the decoded train split, memory against disk
(data only, the worst case for disk), the first disk epoch (right after the entry's write),
and the time of --train-steps training steps of the reference CNN on it.
Targets (issue 12): ingest at least as fast as the reference; disk epochs within 10% of memory.

With --audit-only: the data audit's cost (data/duplicates.py: perceptual hashes, duplicate
pairs, original sizes) against decoding, in fresh processes alternating with and without it
(memory mode), and on a reused disk cache entry (the hashes kept beside it). Part of the audit's
work is done by the decoding itself (data/audit_inputs.py: each batch hashed as it is decoded),
so the side without the audit decodes the same way without it (a decoder of its own, as a
logged model's, takes no audit inputs); the audit's cost is then what the audited side spends
more, decoding and auditing, over the other's decoding. Target (issue 28): the audit within 5%
of the decoding time.

Then (alone with --verify-only) the cost of checking an entry's checksums when it is reused: the
entry is opened with and without the check and read once (a data-only epoch of
fit.train_batches), from the page cache and from the disk (the entry's pages dropped first with
posix_fadvise, which touches no other file). The pairs alternate in one process per setting,
TensorFlow started before the first: a fresh process per read varied more than the check costs.
Printed: best, median and the median of the pairs' ratios, wall and CPU time (all threads).
Target (issue 24): the verified read within 5% of the unverified one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from _timing import cpu  # a sibling module: these scripts run as benchmarks/NAME.py

import insect_exp  # noqa: F401  (stdlib only: sets TF_USE_LEGACY_KERAS before TensorFlow loads)

if TYPE_CHECKING:
    from insect_exp.data.cache import ImageCache
    from insect_exp.data.scan import FileList

HERE = Path(__file__).resolve()
CLASSES = ("beetles", "cockroach", "dragonflies")


def _photo(args: tuple[Path, int, bool, int]) -> None:
    """One image: smooth colour fields, edges and fine noise, so JPEGs compress like photos."""
    import numpy as np
    from PIL import Image, ImageFilter

    path, seed, png, photo_width = args
    rng = np.random.default_rng(seed)
    width, height = (96, 96) if png else (photo_width, photo_width * 3 // 4)
    coarse = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16)
    pixels += rng.integers(-18, 18, pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    if png:
        image.save(path)
    else:
        image.save(path, quality=90)


def generate(root: Path, count: int, png: bool, photo_width: int = 500) -> Path:
    """ROOT/train/<class>/*: COUNT images (kept across runs: done once per work dir)."""
    marker = root / f".complete-{count}"
    if marker.exists():
        return root
    jobs = []
    for i in range(count):
        folder = root / "train" / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:06d}.{'png' if png else 'jpg'}", i, png, photo_width))
    start = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_photo, jobs, chunksize=64))
    size = sum(job[0].stat().st_size for job in jobs) / 2**20
    print(f"generated {count} images ({size:.0f} MB) in {time.perf_counter() - start:.0f} s")
    marker.touch()
    return root


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far, every thread's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def phase(name: str, root: Path, cache_dir: Path, image_size: int, train_steps: int) -> dict:
    """One measurement, in this (fresh) process."""
    import tf_keras as keras

    from insect_exp.config import CacheMode
    from insect_exp.data.cache import CachePolicy
    from insect_exp.data.pipeline import load
    from insect_exp.data.scan import scan

    size = (image_size, image_size)
    start, cpu_start = time.perf_counter(), _cpu_s()  # imports done: both sides time listing,
    if name == "reference":  # reading and decoding
        ds = keras.utils.image_dataset_from_directory(
            root / "train", image_size=size, batch_size=32
        )
        count = sum(int(x.shape[0]) for x, _ in ds)
        return {
            "images": count,
            "seconds": time.perf_counter() - start,
            "cpu_s": _cpu_s() - cpu_start,
            "rss_mb": _peak_rss_mb(),
        }

    mode = CacheMode.disk if name.startswith("disk") else CacheMode.memory
    policy = CachePolicy(mode, cache_dir, 2**40, 2**40)
    if name.startswith("audit-"):  # memory mode, as `load` decodes it, audited or not
        data = decoded(scan(root), size, name == "audit-on")
        return audited(data, root, None, time.perf_counter() - start, _cpu_s() - cpu_start)
    data = load(scan(root), size, val_split=0.1, seed=0, cache=policy)
    if name.endswith("audit"):
        return audited(data, root, policy, time.perf_counter() - start, _cpu_s() - cpu_start)
    result = {
        "images": len(data.train) + len(data.val),
        "seconds": time.perf_counter() - start,
        "cpu_s": _cpu_s() - cpu_start,
        "rss_mb": _peak_rss_mb(),
    }
    if name.endswith("epochs"):
        result.update(epochs(data.train, train_steps))
    return result


def decoded(manifest, size: tuple[int, int], audit_inputs: bool):
    """The train split decoded into memory and a tenth held out, as `load` does; with or without
    the audit's inputs (`FileList.audit`, off where a run audits nothing)."""
    from insect_exp.data.pipeline import Data, decode_files
    from insect_exp.data.scan import stratified_split

    files = dataclasses.replace(manifest.train, audit=audit_inputs)
    split, _ = decode_files(files, size)
    train, val = split.partition(*stratified_split(split.labels, 0.1, 0))
    return Data(manifest.class_names, train, val, None)


def audited(data, root: Path, policy, decode_s: float, decode_cpu_s: float) -> dict:
    """The audit of decoded DATA, timed, beside the decoding's time (this process's); without
    the decoding's audit inputs (`decoded`), only the decoding is timed."""
    from insect_exp.config import FolderDatasetConfig
    from insect_exp.data.audit import audit_data

    result = {"images": len(data.train) + len(data.val), "decode_s": decode_s}
    result.update(decode_cpu_s=decode_cpu_s, audit_s=0.0, audit_cpu_s=0.0, pairs=0)
    if data.train.audit_inputs is None and policy is None:
        return result
    start, cpu_start = time.perf_counter(), _cpu_s()
    audit = audit_data(data, FolderDatasetConfig(root=str(root)), policy).audit
    result.update(audit_s=time.perf_counter() - start, audit_cpu_s=_cpu_s() - cpu_start)
    result.update(pairs=len(audit.rows), hash_us=hash_us(data.train.images))
    return result


def hash_us(images) -> float:
    """CPU microseconds per image of what decoding adds for the audit (hashing each decoded
    batch), timed alone on one thread over IMAGES: steadier than a difference of two runs."""
    from insect_exp.data.duplicates import hash_batch

    start = time.process_time()
    for first in range(0, len(images), 64):
        hash_batch(images[first : first + 64])
    return (time.process_time() - start) / len(images) * 1e6


def audit_cost(args: argparse.Namespace, root: Path, work: Path) -> None:
    """Print the audit's time against the decoding's: memory mode, then a reused disk entry."""
    runs: dict[str, list[dict]] = {"audit-off": [], "audit-on": []}
    cache_dir = Path(tempfile.mkdtemp(prefix="cache_", dir=work))
    for _ in range(args.repeats):
        for name, done in runs.items():
            done.append(run_phase(name, args, root, cache_dir))
    off, on = runs["audit-off"], runs["audit-on"]
    for unit, key in (("wall", "_s"), ("CPU", "_cpu_s")):
        plain = [r[f"decode{key}"] for r in off]
        decoding = [r[f"decode{key}"] for r in on]
        total = [r[f"decode{key}"] + r[f"audit{key}"] for r in on]
        audit = [r[f"audit{key}"] for r in on]
        for how, pick in (("best", min), ("median", statistics.median)):
            share = pick(total) / pick(plain) - 1
            print(f"{unit} {how} of {args.repeats}: decoding {pick(plain):.2f} s without the "
                  f"audit, {pick(decoding):.2f} s with its inputs, then the audit "
                  f"{pick(audit):.2f} s: the audit costs {100 * share:.1f}% of the decoding "
                  "(target <= 5%)")  # fmt: skip
    per_image = statistics.median(r["decode_cpu_s"] / r["images"] for r in off) * 1e6
    hashing = statistics.median(r["hash_us"] for r in on)
    print(f"decoding: {per_image:.0f} us of CPU an image; hashing a decoded batch, alone on one "
          f"thread: {hashing:.1f} us an image ({100 * hashing / per_image:.1f}%); "
          f"pairs found: {on[0]['pairs']}")  # fmt: skip
    first = run_phase("disk-audit", args, root, cache_dir)
    again = run_phase("disk-audit", args, root, cache_dir)
    print(f"disk cache: the audit {first['audit_s']:.2f} s when the entry is written, "
          f"{again['audit_s']:.2f} s when it is reused (decoding reused: "
          f"{again['decode_s']:.2f} s)")  # fmt: skip
    shutil.rmtree(cache_dir)


def epochs(split, train_steps: int) -> dict:
    """Steady data-only epoch time, and the time of TRAIN_STEPS training steps of the CNN."""
    import tf_keras as keras

    from insect_exp.config import CNNConfig
    from insect_exp.fit import train_batches
    from insect_exp.models.cnn import CNNRecipe

    batch = 32
    steps = -(-len(split) // batch)
    it = iter(train_batches(split, batch, seed=0))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        times.append(time.perf_counter() - start)
    size = [int(v) for v in split.images.shape[1:3]]
    model = CNNRecipe(CNNConfig(image_size=size)).build(3)
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    train = train_batches(split, batch, seed=0)
    model.fit(train, epochs=1, steps_per_epoch=20, verbose=0)  # warm-up: graph, threads
    start = time.perf_counter()
    model.fit(train, epochs=1, steps_per_epoch=train_steps, verbose=0)
    return {
        "first_data_epoch_s": times[0],
        "data_epoch_s": min(times[1:]),
        "train_steps_s": time.perf_counter() - start,
    }


def verified_read(
    cache: ImageCache, files: FileList, shape: tuple[int, int, int], verify: bool, cold: bool
) -> dict:
    """Open the train split's entry (its records' checksums checked as they are read, or not) and
    read it once."""
    import numpy as np

    from insect_exp.data.cache import split_key
    from insect_exp.data.pipeline import ImageSplit
    from insect_exp.fit import train_batches

    key = split_key(files.paths, shape[:2])
    if cold:
        fd = os.open(cache.entry_path(key), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    start, cpu_start = time.perf_counter(), _cpu_s()
    entry = cache.open(key, len(files), shape, verify=verify)
    assert entry is not None
    split = ImageSplit(entry.images, np.asarray(files.labels, np.int32), list(files.paths))
    for _ in train_batches(split, 32, seed=0).take(-(-len(split) // 32)):
        pass
    return {"wall_s": time.perf_counter() - start, "cpu_s": _cpu_s() - cpu_start}


def paired_reads(root: Path, cache_dir: Path, image_size: int, cold: bool, pairs: int) -> dict:
    """PAIRS reads of the entry each way, alternating which goes first, in this process."""
    import numpy as np

    from insect_exp.data.cache import ImageCache
    from insect_exp.data.pipeline import ImageSplit
    from insect_exp.data.scan import scan
    from insect_exp.fit import train_batches

    files = scan(root).train
    cache = ImageCache(cache_dir, 2**40)
    dummy = ImageSplit(np.zeros(1, np.uint8), np.zeros(1, np.int32), [])
    next(iter(train_batches(dummy, 1, 0)))  # TensorFlow's start-up, outside the timing
    shape = (image_size, image_size, 3)
    runs: dict[str, list[dict]] = {"unverified": [], "verified": []}
    for i in range(pairs):
        for verify in (i % 2 == 1, i % 2 == 0):
            side = "verified" if verify else "unverified"
            runs[side].append(verified_read(cache, files, shape, verify, cold))
    return runs


def verify_cost(args: argparse.Namespace, root: Path, work: Path) -> None:
    """Print the time to open and read an entry, its checksums checked or not."""
    cache_dir = Path(tempfile.mkdtemp(prefix="cache_", dir=work))
    run_phase("disk", args, root, cache_dir)
    for cold in (False, True):
        runs = run_phase(f"reads-{int(cold)}", args, root, cache_dir)
        where = "from the disk" if cold else "page cache"
        print(f"reusing the entry, {where}: open + one data-only epoch, {args.repeats} pairs")
        for measure in ("wall_s", "cpu_s"):
            plain = [r[measure] for r in runs["unverified"]]
            checked = [r[measure] for r in runs["verified"]]
            pair = statistics.median(c / p for c, p in zip(checked, plain, strict=True))
            print(f"  {measure[:-2]:4}: unverified {min(plain):.3f} s best, "
                  f"{statistics.median(plain):.3f} median; verified {min(checked):.3f} best, "
                  f"{statistics.median(checked):.3f} median; verified / unverified "
                  f"{min(checked) / min(plain):.3f}x best, "
                  f"{statistics.median(checked) / statistics.median(plain):.3f}x median, "
                  f"{pair:.3f}x median of the pairs (target <= 1.05)")  # fmt: skip
    shutil.rmtree(cache_dir)


def run_phase(name: str, args: argparse.Namespace, root: Path, cache_dir: Path) -> dict:
    cmd = [
        sys.executable, str(HERE), "--phase", name, "--root", str(root),
        "--cache-dir", str(cache_dir), "--image-size", str(args.image_size),
        "--train-steps", str(args.train_steps), "--repeats", str(args.repeats),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_touch_s_per_gb() -> tuple[float, float]:
    """Seconds a fresh process takes to fill 1 GB of new memory: as a NumPy array, and as the
    array memory mode decodes into (`data.pipeline.fresh_array`: a private mapping, populated).

    NumPy advises the kernel to back large arrays with transparent huge pages: 0.3 s per GB on
    this sandbox's VM when free huge pages are at hand, 1.3-2.9 s when the kernel compacts memory
    to find them (THP defrag "madvise"), as it does after a folder of images has filled the
    page cache. Memory mode's array took 0.32-0.37 s either way. A loader that keeps its images
    pays this per GB held; one that streams and forgets (the reference) barely does.
    """
    code = (
        "import time, numpy as np; from insect_exp.data.pipeline import fresh_array; "
        "t = time.perf_counter(); a = np.ones(2**30, np.uint8); t1 = time.perf_counter(); "
        "b = fresh_array((2**30,)); b.fill(1); print(t1 - t, time.perf_counter() - t1)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    numpy_s, ours_s = (float(v) for v in out.stdout.split()[-2:])
    return numpy_s, ours_s


def _touch_line() -> str:
    numpy_s, ours_s = first_touch_s_per_gb()
    return (
        f"filling 1 GB of fresh memory takes {numpy_s:.2f} s as a NumPy array (huge pages), "
        f"{ours_s:.2f} s as memory mode's array (a populated private mapping)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="images (default 20,000; 60,000 with --png)")
    parser.add_argument("--png", action="store_true", help="small 96x96 PNGs instead of photos")
    parser.add_argument("--photo-width", type=int, default=500, help="JPEGs' width (4:3)")
    parser.add_argument("--image-size", type=int, default=180)
    parser.add_argument("--train-steps", type=int, default=100, help="CNN steps timed per mode")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    parser.add_argument("--work", type=Path, help="work dir (kept: generated images are reused)")
    parser.add_argument(
        "--verify-only", action="store_true", help="only the cost of checking a reused entry"
    )
    parser.add_argument("--audit-only", action="store_true", help="only the data audit's cost")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase and args.phase.startswith("reads-"):
        cold = args.phase == "reads-1"
        result = paired_reads(args.root, args.cache_dir, args.image_size, cold, args.repeats)
        print(json.dumps(result))
        return
    if args.phase:
        result = phase(args.phase, args.root, args.cache_dir, args.image_size, args.train_steps)
        print(json.dumps(result))
        return

    count = args.count or (60_000 if args.png else 20_000)
    work = args.work or Path(tempfile.mkdtemp(prefix="insect_ingest_bench_"))
    w = args.photo_width
    kind = "png96" if args.png else f"jpeg{w}x{w * 3 // 4}"
    root = generate(work / f"{kind}-{count}", count, args.png, w)
    print(f"cpu: {cpu()}")
    print(f"data: {count} {kind} images in {root}; decoded at {args.image_size} px")
    print(f"best of {args.repeats} alternating runs of each side (the machine may be shared)")
    if args.verify_only:
        verify_cost(args, root, work)
        return
    if args.audit_only:
        audit_cost(args, root, work)
        return
    print(_touch_line())
    every: dict[str, list[dict]] = {"reference": [], "memory": [], "disk": []}
    for _ in range(args.repeats):
        for name, runs in every.items():
            cache_dir = Path(tempfile.mkdtemp(prefix="cache_", dir=work))  # a cold cache each time
            runs.append(run_phase(name, args, root, cache_dir))
            shutil.rmtree(cache_dir)
    # Best and median wall time; CPU seconds (every thread's) vary less on a shared machine.
    results = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in every.items()}
    median = {name: statistics.median(r["seconds"] for r in runs) for name, runs in every.items()}
    for name, r in results.items():
        rate = r["images"] / r["seconds"]
        print(f"{name:>9} ingest: {r['seconds']:6.1f} s (median {median[name]:.1f})  "
              f"{rate:7.0f} images/s  CPU {r['cpu_s']:5.1f} s  "
              f"peak RSS {r['rss_mb']:6.0f} MB")  # fmt: skip
    for name in ("memory", "disk"):
        ratio = results[name]["seconds"] / results["reference"]["seconds"]
        ratio_median = median[name] / median["reference"]
        print(f"{name} ingest time / reference: {ratio:.2f} best, {ratio_median:.2f} median "
              "(target <= 1)")  # fmt: skip
    held = count * args.image_size**2 * 3 / 2**30
    print(f"the decoded images: {held:.2f} GB, held in memory or written to the disk cache")
    print(f"again: {_touch_line()}")
    cache_dir = Path(tempfile.mkdtemp(prefix="cache_", dir=work))
    # Write the entry: the first epoch of the first disk run below reads it right after the write.
    run_phase("disk", args, root, cache_dir)
    runs: dict[str, list[dict]] = {"memory": [], "disk": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(run_phase(f"{name}-epochs", args, root, cache_dir))
    memory, disk = (
        {k: min(r[k] for r in runs[name]) for k in runs[name][0]} for name in ("memory", "disk")
    )
    cold = runs["disk"][0]["first_data_epoch_s"]
    print(f"data-only epoch: memory {memory['data_epoch_s']:.2f} s, disk {disk['data_epoch_s']:.2f}"
          f" s ({disk['data_epoch_s'] / memory['data_epoch_s']:.2f}x); the first one, right "
          f"after the write: {cold:.2f} s")  # fmt: skip
    print(f"{args.train_steps} CNN training steps: memory {memory['train_steps_s']:.1f} s, disk "
          f"{disk['train_steps_s']:.1f} s ({disk['train_steps_s'] / memory['train_steps_s']:.2f}x,"
          " target <= 1.10)")  # fmt: skip
    print(f"peak RSS after the epochs: memory {memory['rss_mb']:.0f} MB, disk {disk['rss_mb']:.0f}"
          " MB")  # fmt: skip
    shutil.rmtree(cache_dir)  # a GB or more: kept, every run would fill the disk
    verify_cost(args, root, work)


if __name__ == "__main__":
    main()
