"""Built-in procedurally drawn demo dataset of three insect classes, cached on disk."""

from __future__ import annotations

import colorsys
import contextlib
import json
import logging
import math
import numbers
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

from insect_exp.data.cache import CACHE_DIR_VARIABLE, cache_root

CLASS_NAMES: tuple[str, ...] = ("beetles", "cockroach", "dragonflies")
SPLITS: tuple[str, ...] = ("train", "test")
MARKER_NAME = ".complete.json"
# Bump whenever drawing code changes, so stale caches are regenerated instead of reused.
FORMAT_VERSION = 1
JPEG_QUALITY = 90

_MAX_CANVAS = 384  # largest square the insect is drawn on before shrinking and rotation
_MIN_SIDE, _MAX_SIDE = 120, 400
_SPLIT_IDS = {"train": 0, "test": 1}
# Keeps these image streams disjoint from any other use of the same user seed.
_SEED_SALT = 0x1D5EC7

log = logging.getLogger(__name__)

Color = tuple[int, int, int]
Point = tuple[float, float]


def default_demo_root() -> pathlib.Path:
    """demo-v1 in the cache root (`cache.cache_root`: $INSECT_EXP_CACHE_DIR, else ~/.cache/...)."""
    return cache_root() / "demo-v1"


def ensure_demo_dataset(
    root: pathlib.Path | str | None = None,
    *,
    train_per_class: int = 120,
    test_per_class: int = 30,
    seed: int = 0,
) -> pathlib.Path:
    """Generate the demo set under root (or default_demo_root()) unless done before; return root."""
    for name, value in (
        ("train_per_class", train_per_class),
        ("test_per_class", test_per_class),
        ("seed", seed),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    where = "dataset.root" if root is not None else CACHE_DIR_VARIABLE
    root = pathlib.Path(root).expanduser() if root is not None else default_demo_root()
    params = _params(int(train_per_class), int(test_per_class), int(seed))
    if _is_complete(root, params):
        return root

    count = len(CLASS_NAMES) * (int(train_per_class) + int(test_per_class))
    log.info(
        "generating the demo data (%d images, once) in %s; set %s=DIR to keep it elsewhere",
        count,
        root,
        where,
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    # A sibling temp dir keeps the final renames on one filesystem, hence atomic. Not mkdtemp:
    # its 0700 mode would follow the rename and hide a shared cache from other users.
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _generate(tmp, params)
        with _install_lock(root):
            # A concurrent generator may have finished first; its identical output wins.
            if not _is_complete(root, params):
                _install(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _params(train_per_class: int, test_per_class: int, seed: int) -> dict[str, Any]:
    """Parameters that fully determine the generated files, as stored in the marker."""
    return {
        "format_version": FORMAT_VERSION,
        "classes": list(CLASS_NAMES),
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
    }


def _is_complete(root: pathlib.Path, params: dict[str, Any]) -> bool:
    """Whether root holds a finished generation made with exactly these params."""
    try:
        stored = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored == params and all((root / split).is_dir() for split in SPLITS)


def _generate(out: pathlib.Path, params: dict[str, Any]) -> None:
    """Write every image of the set under out, then the completion marker."""
    counts = {"train": int(params["train_per_class"]), "test": int(params["test_per_class"])}
    seed = int(params["seed"])
    for split in SPLITS:
        for class_id, class_name in enumerate(CLASS_NAMES):
            class_dir = out / split / class_name
            class_dir.mkdir(parents=True)
            for index in range(counts[split]):
                rng = np.random.default_rng([_SEED_SALT, seed, _SPLIT_IDS[split], class_id, index])
                image = _render_image(class_name, rng)
                image.save(
                    class_dir / f"{class_name}_{index:04d}.jpg", "JPEG", quality=JPEG_QUALITY
                )
    (out / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n", "utf-8")


@contextlib.contextmanager
def _install_lock(root: pathlib.Path) -> Iterator[None]:
    """Serialise installs into root across processes (best effort where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: installs are rare and concurrent ones produce identical files
        yield
        return
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _install(tmp: pathlib.Path, root: pathlib.Path) -> None:
    """Move a finished generation from tmp into root, marker last."""
    if not root.exists():
        tmp.rename(root)
        return
    # Invalidate first so a crash mid-swap never leaves a marker over mixed content.
    (root / MARKER_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        target = root / split
        if target.exists():
            shutil.rmtree(target)
        (tmp / split).rename(target)
    os.replace(tmp / MARKER_NAME, root / MARKER_NAME)


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    """One uniform float in [low, high)."""
    return float(rng.uniform(low, high))


def _hsv(h: float, s: float, v: float) -> Color:
    """RGB triple from HSV components, clipping s and v into [0, 1]."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _scale(color: Color, factor: float) -> Color:
    """Colour darkened (factor < 1) or lightened towards white (factor > 1)."""
    if factor <= 1.0:
        return _mix((0, 0, 0), color, factor)
    return _mix(color, (255, 255, 255), min(factor - 1.0, 1.0))


def _mix(a: Color, b: Color, t: float) -> Color:
    """Linear blend of two colours, t=0 giving a."""
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 48
) -> list[Point]:
    """Polygon approximating an ellipse rotated by angle (radians)."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return list(zip((cx + ca * x - sa * y).tolist(), (cy + sa * x + ca * y).tolist(), strict=True))


def _shield(cx: float, cy: float, rx: float, ry: float) -> list[Point]:
    """Head-up shield outline: a half ellipse in front and a much flatter one behind."""
    t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    y = np.sin(t) * np.where(np.sin(t) < 0.0, ry, ry * 0.35)
    return list(zip((cx + rx * np.cos(t)).tolist(), (cy + y).tolist(), strict=True))


def _lw(c: float, width: float) -> int:
    """Line width for canvas side c, given the width wanted at the largest canvas."""
    return max(1, round(width * c / _MAX_CANVAS))


def _polyline(
    draw: ImageDraw.ImageDraw, points: Sequence[Point], color: Color, width: float
) -> None:
    """Thick polyline with rounded joints."""
    w = max(1, round(width))
    draw.line(list(points), fill=color + (255,), width=w, joint="curve")
    r = w / 2.0
    for x, y in points:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color + (255,))


def _limb(
    start: Point, angles: Sequence[float], lengths: Sequence[float], mirror: bool
) -> list[Point]:
    """Joint positions of a limb given absolute segment angles in degrees for the right side."""
    x, y = start
    points = [(x, y)]
    for angle, length in zip(angles, lengths, strict=True):
        a = math.radians(angle)
        x += (-1.0 if mirror else 1.0) * math.cos(a) * length
        y += math.sin(a) * length
        points.append((x, y))
    return points


def _shaded_ellipse(
    draw: ImageDraw.ImageDraw,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    base: Color,
    shine: float,
    steps: int = 7,
) -> None:
    """Ellipse with concentric lighter rings drifting to the upper left, faking a glossy surface."""
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_scale(base, 0.7) + (255,))
    for i in range(steps):
        t = i / steps
        k = 1.0 - 0.85 * t
        ox, oy = -0.35 * rx * t, -0.35 * ry * t
        color = _scale(base, 0.8 + t * (0.25 + shine))
        r_x, r_y = rx * k * 0.97, ry * k * 0.97
        draw.ellipse(
            (cx + ox - r_x, cy + oy - r_y, cx + ox + r_x, cy + oy + r_y), fill=color + (255,)
        )


def _draw_beetle(rng: np.random.Generator, size: int) -> Image.Image:
    """Rounded glossy beetle: head, pronotum, elytra with a seam, six short legs."""
    c = float(size)
    cx = c / 2.0
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    ladybird = rng.random() < 0.15
    if ladybird:
        base = _hsv(_u(rng, -0.02, 0.09), _u(rng, 0.75, 1.0), _u(rng, 0.7, 0.95))
    else:
        # Dark metallic tones: green, blue, purple, bronze, teal; low saturation reads as black.
        hue = float(rng.choice([0.3, 0.6, 0.75, 0.08, 0.45])) + _u(rng, -0.04, 0.04)
        base = _hsv(hue, _u(rng, 0.2, 0.85), _u(rng, 0.15, 0.45))
    dark = _hsv(_u(rng, 0.0, 1.0), _u(rng, 0.1, 0.4), _u(rng, 0.05, 0.18))
    el_rx, el_ry = c * _u(rng, 0.19, 0.26), c * _u(rng, 0.24, 0.3)
    el_cy = c * 0.33 + el_ry
    pr_rx, pr_ry = el_rx * _u(rng, 0.62, 0.85), c * _u(rng, 0.07, 0.095)
    pr_cy = c * 0.33
    hd_r = c * _u(rng, 0.045, 0.065)
    hd_cy = pr_cy - pr_ry - hd_r * 0.5

    leg_w = c * _u(rng, 0.012, 0.018)
    for i, (y_frac, a1, a2) in enumerate(((0.0, -40, -80), (0.35, 10, -10), (0.7, 40, 80))):
        for mirror in (False, True):
            start = (cx, pr_cy + y_frac * (el_cy - pr_cy) + c * 0.02)
            jitter = rng.normal(0.0, 8.0, 2)
            pts = _limb(
                start,
                (a1 + jitter[0], a2 + jitter[1]),
                (el_rx * 1.05 + c * 0.05 * (i == 2), c * _u(rng, 0.1, 0.15)),
                mirror,
            )
            _polyline(draw, pts, dark, leg_w)
    for mirror in (False, True):
        start = (cx + (-1 if mirror else 1) * hd_r * 0.5, hd_cy - hd_r * 0.6)
        ant_len = c * _u(rng, 0.05, 0.09)
        pts = _limb(start, (-70 + _u(rng, -10, 10), -40 + _u(rng, -15, 15)), (ant_len,) * 2, mirror)
        _polyline(draw, pts, dark, leg_w * 0.7)
        club = leg_w * _u(rng, 0.8, 1.6)
        x, y = pts[-1]
        draw.ellipse((x - club, y - club, x + club, y + club), fill=dark + (255,))

    _shaded_ellipse(draw, cx, el_cy, el_rx, el_ry, base, _u(rng, 0.2, 0.6))
    seam = _scale(base, 0.35)
    draw.line(
        [(cx, el_cy - el_ry * 0.95), (cx, el_cy + el_ry * 0.98)],
        fill=seam + (255,),
        width=_lw(c, 3),
    )
    if ladybird:
        for _ in range(int(rng.integers(2, 7))):
            sx, sy = _u(rng, 0.15, 0.75) * el_rx, _u(rng, -0.7, 0.7) * el_ry
            sr = c * _u(rng, 0.02, 0.04)
            for side in (-1, 1):
                x = cx + side * sx
                draw.ellipse((x - sr, el_cy + sy - sr, x + sr, el_cy + sy + sr), fill=dark + (255,))
        pronotum = dark
    else:
        pronotum = _scale(base, _u(rng, 0.75, 1.05))
    _shaded_ellipse(draw, cx, pr_cy, pr_rx, pr_ry, pronotum, 0.3, steps=4)
    draw.ellipse(
        (cx - hd_r, hd_cy - hd_r, cx + hd_r, hd_cy + hd_r), fill=_scale(pronotum, 0.8) + (255,)
    )
    return img


def _draw_cockroach(rng: np.random.Generator, size: int) -> Image.Image:
    """Flat elongated brown cockroach with pale-rimmed pronotum, long antennae and spiny legs."""
    c = float(size)
    cx = c / 2.0
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    base = _hsv(_u(rng, 0.03, 0.1), _u(rng, 0.55, 0.9), _u(rng, 0.25, 0.7))
    limb = _scale(base, _u(rng, 0.55, 0.85))
    body_rx = c * _u(rng, 0.095, 0.125)
    # Body kept short of the canvas top so the long antennae still fit on it.
    body_top, body_bot = c * _u(rng, 0.3, 0.35), c * _u(rng, 0.84, 0.9)
    body_cy, body_ry = (body_top + body_bot) / 2.0, (body_bot - body_top) / 2.0
    pr_ry = c * _u(rng, 0.08, 0.1)
    pr_cy = body_top + pr_ry * 0.8
    head_y = pr_cy - pr_ry * 0.85

    leg_w = c * _u(rng, 0.009, 0.014)
    legs = (
        (0.05, (-30, 20, 60), (0.1, 0.1, 0.08)),
        (0.22, (10, 45, 70), (0.11, 0.13, 0.1)),
        (0.36, (35, 65, 85), (0.13, 0.17, 0.11)),
    )
    for y_frac, angles, lengths in legs:
        for mirror in (False, True):
            jitter = rng.normal(0.0, 7.0, 3)
            pts = _limb(
                (cx, body_top + y_frac * (body_bot - body_top) + c * 0.06),
                [a + j for a, j in zip(angles, jitter, strict=True)],
                [body_rx * 0.8 + c * lengths[0]] + [c * n for n in lengths[1:]],
                mirror,
            )
            _polyline(draw, pts, limb, leg_w)
            (x0, y0), (x1, y1) = pts[1], pts[2]
            for t in (0.3, 0.55, 0.8):
                px, py = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
                draw.line(
                    [(px, py), (px + (x1 - x0) * 0.12 + c * 0.008, py - c * 0.013)],
                    fill=limb + (255,),
                )

    for mirror in (False, True):
        sign = -1.0 if mirror else 1.0
        x, y = cx + sign * c * 0.02, head_y - pr_ry * 0.2
        angle, bend, seg = -85.0 + _u(rng, -10, 15), _u(rng, 3, 10), c * _u(rng, 0.035, 0.05)
        pts = [(x, y)]
        for _ in range(12):
            a = math.radians(angle)
            x += sign * math.cos(a) * seg
            y += math.sin(a) * seg
            pts.append((x, y))
            angle += bend + _u(rng, -6, 6)
        _polyline(draw, pts, _scale(limb, 0.8), leg_w * 0.6)
        cerci = _limb((cx, body_bot - c * 0.02), (75 + _u(rng, -8, 8),), (c * 0.06,), mirror)
        _polyline(draw, cerci, limb, leg_w * 0.8)

    draw.ellipse(
        (cx - body_rx, body_cy - body_ry, cx + body_rx, body_cy + body_ry),
        fill=_scale(base, 0.6) + (255,),
    )
    wing = _scale(base, _u(rng, 0.95, 1.2))
    wing_top = pr_cy
    wing_ry = (body_bot + c * _u(rng, 0.0, 0.03) - wing_top) / 2.0
    for side in (-1.0, 1.0):
        wcx = cx + side * body_rx * 0.22
        poly = _ellipse(wcx, wing_top + wing_ry, body_rx * 0.8, wing_ry, side * 0.03)
        draw.polygon(poly, fill=_scale(wing, 1.0 + 0.05 * side) + (255,))
    # The right wing, drawn last, shows its inner edge as the seam.
    draw.line(poly[12:37], fill=_scale(base, 0.5) + (255,), width=_lw(c, 2))
    pr_rx = body_rx * _u(rng, 1.02, 1.15)
    draw.polygon(_ellipse(cx, head_y, pr_rx * 0.35, pr_ry * 0.4), fill=_scale(base, 0.45) + (255,))
    rim = _mix(base, (225, 200, 150), _u(rng, 0.1, 0.45))
    draw.polygon(_shield(cx, pr_cy, pr_rx, pr_ry), fill=rim + (255,))
    # The dark disc sits towards the rear, leaving the broad pale margin at the front.
    inner = _scale(base, _u(rng, 0.7, 0.9))
    draw.polygon(_shield(cx, pr_cy + pr_ry * 0.15, pr_rx * 0.7, pr_ry * 0.7), fill=inner + (255,))
    if rng.random() < 0.5:  # German-cockroach stripes
        for side in (-1.0, 1.0):
            sx = cx + side * body_rx * 0.3
            draw.line(
                [(sx, pr_cy - pr_ry * 0.6), (sx, pr_cy + pr_ry * 0.6)],
                fill=(25, 18, 12, 255),
                width=_lw(c, 4),
            )
    return img


def _draw_dragonfly(rng: np.random.Generator, size: int) -> Image.Image:
    """Dragonfly: big eyes, four veined translucent wings, long thin banded abdomen."""
    c = float(size)
    cx = c / 2.0
    hue = float(rng.choice([0.58, 0.33, 0.0, 0.08, 0.5, 0.15])) + _u(rng, -0.04, 0.04)
    base = _hsv(hue, _u(rng, 0.45, 0.95), _u(rng, 0.45, 0.9))
    dark = _hsv(hue, _u(rng, 0.3, 0.7), _u(rng, 0.1, 0.25))
    wings = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    wdraw = ImageDraw.Draw(wings)
    tint = _hsv(_u(rng, 0.05, 0.6), _u(rng, 0.0, 0.35), _u(rng, 0.8, 1.0))
    alpha = int(rng.integers(80, 160))
    vein = _mix(dark, tint, 0.3)
    thorax_cy = c * 0.22
    for attach_y, ang, width in (
        (thorax_cy - c * 0.02, -6.0, 0.065),  # forewings
        (thorax_cy + c * 0.035, 8.0, 0.085),  # broader hindwings
    ):
        length = c * _u(rng, 0.36, 0.44)
        w = c * (width + _u(rng, -0.01, 0.015))
        for mirror in (False, True):
            sign = -1.0 if mirror else 1.0
            a = math.radians(ang + _u(rng, -6, 6))
            ux, uy = sign * math.cos(a), math.sin(a)
            x0, y0 = cx + sign * c * 0.03, attach_y
            wcx, wcy = x0 + ux * length / 2.0, y0 + uy * length / 2.0
            rot = math.atan2(uy, ux)
            wdraw.polygon(_ellipse(wcx, wcy, length / 2.0, w / 2.0, rot), fill=tint + (alpha,))
            nx, ny = -uy, ux
            for off in (-0.38, -0.1, 0.2):
                o = off * w
                wdraw.line(
                    [
                        (x0 + nx * o * 0.3, y0 + ny * o * 0.3),
                        (x0 + ux * length * 0.93 + nx * o, y0 + uy * length * 0.93 + ny * o),
                    ],
                    fill=vein + (170,),
                    width=_lw(c, 1),
                )
            for t in np.linspace(0.15, 0.85, 7).tolist():
                px, py = x0 + ux * length * t, y0 + uy * length * t
                half = w * 0.42 * math.sin(math.pi * min(t + 0.1, 1.0)) + 1.0
                wdraw.line(
                    [(px - nx * half, py - ny * half), (px + nx * half, py + ny * half)],
                    fill=vein + (110,),
                    width=_lw(c, 1),
                )
            lead = -0.45 * w
            wdraw.line(
                [
                    (x0, y0),
                    (
                        x0 + ux * length * 0.97 + nx * lead * 0.4,
                        y0 + uy * length * 0.97 + ny * lead * 0.4,
                    ),
                ],
                fill=vein + (230,),
                width=_lw(c, 2),
            )
            sx, sy = (
                x0 + ux * length * 0.86 + nx * lead * 0.6,
                y0 + uy * length * 0.86 + ny * lead * 0.6,
            )
            wdraw.polygon(_ellipse(sx, sy, length * 0.035, w * 0.09, rot, 12), fill=dark + (230,))

    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i in range(3):
        for mirror in (False, True):
            pts = _limb(
                (cx, thorax_cy + c * (0.01 + 0.02 * i)),
                (20 + 25 * i + _u(rng, -10, 10), 80 + _u(rng, -10, 10)),
                (c * 0.05, c * 0.05),
                mirror,
            )
            _polyline(draw, pts, dark, c * 0.0065)
    ab_top, ab_len = thorax_cy + c * 0.05, c * _u(rng, 0.52, 0.62)
    bend = _u(rng, -0.25, 0.25)
    n_seg = 10
    seg_len = ab_len / n_seg
    x, y, heading = cx, ab_top, math.pi / 2.0
    for i in range(n_seg):
        r = c * (0.026 - 0.008 * i / n_seg) * (1.3 if i == 0 else 1.0)
        nx_, ny_ = x + math.cos(heading) * seg_len, y + math.sin(heading) * seg_len
        mx, my = (x + nx_) / 2.0, (y + ny_) / 2.0
        draw.polygon(_ellipse(mx, my, seg_len * 0.62, r, heading, 20), fill=base + (255,))
        ring = _ellipse(nx_, ny_, seg_len * 0.12, r * 0.95, heading, 12)
        draw.polygon(ring, fill=dark + (255,))
        x, y = nx_, ny_
        heading += bend / n_seg
    draw.polygon(_ellipse(cx, thorax_cy, c * 0.05, c * 0.075), fill=_scale(base, 0.85) + (255,))
    draw.line(
        [(cx, thorax_cy - c * 0.06), (cx, thorax_cy + c * 0.06)],
        fill=dark + (255,),
        width=_lw(c, 3),
    )
    eye = _hsv(float(rng.choice([0.58, 0.33, 0.08, 0.0])), _u(rng, 0.3, 0.8), _u(rng, 0.25, 0.7))
    eye_r, eye_y = c * _u(rng, 0.038, 0.05), thorax_cy - c * 0.1
    for side in (-1.0, 1.0):
        ex = cx + side * eye_r * 0.8
        _shaded_ellipse(draw, ex, eye_y, eye_r, eye_r, eye, 0.5, steps=4)
    return Image.alpha_composite(wings, img)


_DRAWERS = {"beetles": _draw_beetle, "cockroach": _draw_cockroach, "dragonflies": _draw_dragonfly}


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1] of shape (h, w) with roughly `cells` blobs across."""
    gw, gh = max(2, cells), max(2, round(cells * h / w))
    grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32), mode="F")
    return np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Random foliage, soil, sky, sand or plain-gradient backdrop with optional clutter."""
    kind = int(rng.integers(0, 5))
    palettes = (
        ((0.22, 0.4), (0.35, 0.75), (0.25, 0.65)),  # foliage
        ((0.05, 0.12), (0.3, 0.6), (0.25, 0.55)),  # soil / bark
        ((0.53, 0.62), (0.2, 0.6), (0.7, 0.97)),  # sky
        ((0.08, 0.16), (0.1, 0.35), (0.6, 0.9)),  # sand / stone
        ((0.0, 1.0), (0.05, 0.4), (0.35, 0.9)),  # gradient
    )
    hr, sr, vr = palettes[kind]
    c1 = _hsv(_u(rng, *hr), _u(rng, *sr), _u(rng, *vr))
    c2 = _hsv(_u(rng, *hr), _u(rng, *sr), _u(rng, *vr))
    theta = _u(rng, 0.0, 2.0 * math.pi)
    xs = np.linspace(0.0, math.cos(theta), w, dtype=np.float32)
    ys = np.linspace(0.0, math.sin(theta), h, dtype=np.float32)
    ramp = xs[None, :] + ys[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    mix = 0.6 * ramp + 0.4 * _smooth_noise(rng, w, h, int(rng.integers(3, 8)))
    if kind != 4:
        mix = 0.5 * mix + 0.5 * _smooth_noise(rng, w, h, int(rng.integers(8, 24)))
    # PIL compositing with a mask is much faster than numpy broadcasting over a trailing RGB axis.
    mask = Image.fromarray((mix * 255.0 + 0.5).astype(np.uint8), "L")
    img = Image.composite(Image.new("RGB", (w, h), c2), Image.new("RGB", (w, h), c1), mask)
    if kind in (1, 3):  # grainy surfaces
        grain = _smooth_noise(rng, w, h, max(w // 4, 2))
        grain_mask = Image.fromarray((grain * 200.0).astype(np.uint8), "L")
        img = Image.composite(img.point(lambda v: v * 4 // 5), img, grain_mask)

    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.5 else 0):
        x, y = _u(rng, 0, w), _u(rng, 0, h)
        size = _u(rng, 0.05, 0.25) * min(w, h)
        clutter = int(rng.integers(0, 3))
        if clutter == 0:  # twig
            a = _u(rng, 0, 2 * math.pi)
            col = _hsv(_u(rng, 0.05, 0.12), _u(rng, 0.3, 0.7), _u(rng, 0.2, 0.55))
            end = (x + math.cos(a) * size * 2, y + math.sin(a) * size * 2)
            draw.line([(x, y), end], fill=col + (255,), width=int(rng.integers(2, 6)))
        elif clutter == 1:  # leaf
            col = _hsv(_u(rng, 0.15, 0.38), _u(rng, 0.3, 0.8), _u(rng, 0.25, 0.7))
            poly = _ellipse(x, y, size, size * _u(rng, 0.25, 0.5), _u(rng, 0, math.pi), 24)
            draw.polygon(poly, fill=col + (int(rng.integers(120, 256)),))
        else:  # pebble
            col = _hsv(_u(rng, 0.0, 0.15), _u(rng, 0.0, 0.25), _u(rng, 0.35, 0.8))
            poly = _ellipse(x, y, size * 0.4, size * 0.3, _u(rng, 0, math.pi), 20)
            draw.polygon(poly, fill=col + (255,))
    return img


def _render_image(class_name: str, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class_name on a random background, fully determined by rng."""
    w = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
    # Bounded aspect ratio: extreme strips would shrink the insect to a few pixels.
    h = int(np.clip(round(w * math.exp(_u(rng, -0.6, 0.6))), _MIN_SIDE, _MAX_SIDE))
    image = _background(rng, w, h)

    side = max(16, round(_u(rng, 0.6, 0.95) * min(w, h)))
    # Drawing at twice the final size is enough antialiasing and far cheaper than a fixed canvas.
    canvas = min(_MAX_CANVAS, 2 * side)
    sprite = _DRAWERS[class_name](rng, canvas).resize((side, side), Image.Resampling.BOX)
    sprite = sprite.rotate(_u(rng, 0.0, 360.0), Image.Resampling.BILINEAR, expand=True)
    sw, sh = sprite.size
    x = round(_u(rng, 0.3, 0.7) * w - sw / 2.0)
    y = round(_u(rng, 0.3, 0.7) * h - sh / 2.0)
    alpha = sprite.getchannel("A")
    if rng.random() < 0.7:  # soft drop shadow grounds the insect in the scene
        blur = alpha.filter(ImageFilter.BoxBlur(max(1, round(min(w, h) * 0.015))))
        shadow = blur.point(lambda v: v * 45 // 100)
        off = round(min(w, h) * _u(rng, 0.005, 0.03))
        image.paste((0, 0, 0), (x + off, y + off), shadow)
    image.paste(sprite, (x, y), alpha)

    if rng.random() < 0.3:
        image = image.filter(ImageFilter.BoxBlur(_u(rng, 0.4, 1.0)))
    # Exposure, contrast and white balance as one per-band lookup table.
    mean = sum(ImageStat.Stat(image).mean) / 3.0
    contrast = _u(rng, 0.8, 1.2)
    lut: list[int] = []
    for gain in (_u(rng, 0.8, 1.15) * rng.uniform(0.92, 1.08, 3)).tolist():
        lut += [min(255, max(0, round(((v - mean) * contrast + mean) * gain))) for v in range(256)]
    image = image.point(lut)
    # Zero-mean triangular noise as (+U - U) of two uniform byte planes, all in PIL's C code:
    # close enough to Gaussian sensor noise at a fraction of the cost of numpy normals.
    spread = _u(rng, 2.0, 7.0) * math.sqrt(6.0)
    scale = [round(v * spread / 256.0) for v in range(256)] * 3
    for op in (ImageChops.add, ImageChops.subtract):
        noise = Image.frombytes("RGB", (w, h), rng.bytes(w * h * 3)).point(scale)
        image = op(image, noise)
    return image
