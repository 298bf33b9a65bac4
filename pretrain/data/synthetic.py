"""Built-in procedural dataset in Pascal-VOC layout, generated on first use (no downloads).

Each scene is a natural-statistics background (random, jittered crops of the photos bundled with
scikit-image / scikit-learn, mixed with 1/f noise) with 1-4 class objects and 0-4 clutter shapes painted
back to front in random order. A class is a *part structure*: a body with specific appendages, holes or
symmetry (a dumbbell is two discs joined by a bar, a fork is a stem with three prongs, a frame is a
square with a square hole). Colour and texture never carry class information: every object, of any class
or clutter, takes its texture and its two colours at random from one shared bank, so only shape (and the
arrangement of parts) tells the classes apart. Clutter shapes are part-less bodies (ellipses, blobs,
irregular polygons, bars) that belong to no class and are labelled background. Scale, rotation, aspect
and position vary per object. Boxes and masks come from the rendered *visible* pixels, so occlusion is
handled exactly; masks carry a 255 "void" band around object boundaries like VOC's outlines.

Everything is deterministic from `seed`: image `i` uses its own generator seeded with
`seed * 1_000_003 + i`, so the output does not depend on the number of workers.

    root = builtin_voc_root()             # <cache>/builtin-v2-n2000-s256-seed0, contains VOC2007/
    root = builtin_pretraining_root()     # same classes, another seed, no image in common with the above
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

# Bump when the generator's output changes: it is part of the cache folder name, so stale caches are
# never reused.
GENERATOR_VERSION = 2

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "dumbbell", "lollipop", "cross", "tee", "ring", "horseshoe",
    "star", "flower", "arrow", "house", "frame", "fork",
)

EVALUATION_SEED = 0  # the set every transfer task trains and tests on (`builtin_voc_root`)
PRETRAINING_SEED = 1  # the labelled set for supervised pretraining (`builtin_pretraining_root`)

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
JPEG_QUALITY = 90
MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_CLUTTER, MAX_CLUTTER = 0, 4
# Object radius as a fraction of the image side (log-uniform): 18-72 px at 256 px, so the thinnest parts
# (a fork's prongs, ~0.09 of the radius) stay at least a pixel or two wide.
MIN_RADIUS, MAX_RADIUS = 0.07, 0.28
# A class is its part structure, so an object with most of it hidden is not annotated; its visible pixels
# become void (255), neither object nor background.
MIN_VISIBLE_FRACTION = 0.25
MIN_VISIBLE_PIXELS = 12
DIFFICULT_BOX_AREA = 12 * 12  # VOC-style: a visible box smaller than this is marked difficult
VOID = 255

@dataclass(frozen=True)
class GenerationStats:
    """What `generate_voc_dataset` produced and how long it took."""

    num_images: int
    num_objects: int
    seconds: float


# --------------------------------------------------------------------------------------------- palette

def voc_palette() -> list[int]:
    """The standard 256-entry Pascal VOC colour map as a flat list of 768 ints (for `Image.putpalette`)."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for j in range(8):  # spread the label's bits over the high bits of r, g, b
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


# ------------------------------------------------------------------------------------ background photos

_SKIMAGE_PHOTOS = (  # all ship inside the scikit-image wheel (checked: load with no network)
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle", "colorwheel",
    "camera", "coins", "brick", "grass", "gravel", "moon", "clock", "cell", "page", "text",
)
_MAX_SOURCE_SIDE = 512
_SOURCES: list[np.ndarray] | None = None


def _load_sources() -> list[np.ndarray]:
    """Bundled photos as uint8 arrays (H, W, 3) or (H, W), longest side <= 512; loaded once per process."""
    global _SOURCES
    if _SOURCES is not None:
        return _SOURCES
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = []
    for name in _SKIMAGE_PHOTOS:
        try:
            im = getattr(skimage.data, name)()
        except Exception:  # a fetcher that needs the network (older/newer scikit-image): skip it
            continue
        if isinstance(im, tuple):  # stereo_motorcycle -> (left, right, disparity)
            im = im[0]
        images.append(np.asarray(im))
    images += [np.asarray(im) for im in load_sample_images().images]  # china, flower
    out = []
    for im in images:
        if im.ndim == 3:
            im = im[..., :3]
        im = im.astype(np.uint8)
        scale = _MAX_SOURCE_SIDE / max(im.shape[:2])
        if scale < 1:
            pil = Image.fromarray(im)
            im = np.asarray(pil.resize((round(im.shape[1] * scale), round(im.shape[0] * scale)),
                                       Image.BILINEAR))
        out.append(im)
    if not out:
        raise RuntimeError("no bundled background photos could be loaded from scikit-image / scikit-learn; "
                           "reinstall scikit-image and scikit-learn in the venv")
    _SOURCES = out
    return out


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) -> RGB float32 (3,)."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.15, 1.0))



def _photo_crop(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random rescaled, flipped, colour-jittered crop of a bundled photo -> float32 (height, width, 3)."""
    sources = _load_sources()
    src = sources[rng.integers(len(sources))]
    h, w = src.shape[:2]
    side = rng.uniform(0.3, 1.0) * min(h, w)
    aspect = rng.uniform(0.8, 1.25) * math.sqrt(width / height)  # the output's shape, mildly rescaled
    cw, ch = min(w, side * aspect), min(h, side / aspect)
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    pil = Image.fromarray(src).resize((width, height), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    im = np.asarray(pil, dtype=np.float32) / 255.0
    if im.ndim == 2:  # grey photo: map through a random two-colour ramp so it is not always grey
        lo, hi = _random_colour(rng) * 0.4, 0.6 + 0.4 * _random_colour(rng)
        mix = rng.uniform(0.0, 1.0)  # 0 = plain grey, 1 = full tint
        lo = (1 - mix) * 0.0 + mix * lo
        hi = (1 - mix) * 1.0 + mix * hi
        im = lo + im[..., None] * (hi - lo)
    if rng.random() < 0.5:
        im = im[:, ::-1]
    if rng.random() < 0.2:
        im = im[::-1]
    # colour jitter: brightness, contrast, saturation, per-channel gain
    grey = im.mean(axis=2, keepdims=True)
    im = grey + (im - grey) * rng.uniform(0.5, 1.4)
    im = (im - im.mean()) * rng.uniform(0.7, 1.3) + im.mean() * rng.uniform(0.75, 1.25)
    im = im * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    return np.ascontiguousarray(np.clip(im, 0, 1), dtype=np.float32)


def _pink_noise(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    """1/f^beta noise (power spectrum), normalised to [0, 1] -> float32 (h, w)."""
    white = rng.standard_normal((h, w)).astype(np.float32)
    spec = np.fft.rfft2(white)  # (h, w//2+1)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    noise = np.fft.irfft2(spec / f ** (beta / 2), s=(h, w)).astype(np.float32)
    noise -= noise.min()
    return noise / max(float(noise.max()), 1e-6)


def _noise_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Procedural 1/f-noise texture mapped through a random colour ramp -> float32 (size, size, 3)."""
    n = _pink_noise(rng, size, size, rng.uniform(1.6, 2.6))
    c0, c1, c2 = _random_colour(rng), _random_colour(rng), _random_colour(rng)
    # three-stop colour ramp: c0 -> c1 -> c2
    t = n[..., None]
    im = np.where(t < 0.5, c0 + (c1 - c0) * (2 * t), c1 + (c2 - c1) * (2 * t - 1))
    im = im + rng.normal(0, 0.015, size=im.shape).astype(np.float32)
    return np.clip(im, 0, 1).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Scene background -> float32 (size, size, 3) in [0, 1]: photo crop, 1/f texture, or a blend."""
    kind = rng.random()
    if kind < 0.55:
        return _photo_crop(rng, size, size)
    if kind < 0.75:
        return _noise_background(rng, size)
    a = rng.uniform(0.25, 0.6)
    return (1 - a) * _photo_crop(rng, size, size) + a * _noise_background(rng, size)



# ---------------------------------------------------------------------------------------------- shapes
# Each shape is an inside test on object-local coordinates (u, v): the object's frame, rotated and scaled so
# the shape lies within a disc of radius ~1.15 around the origin. `p` holds the instance's proportions,
# jittered within ranges that keep the part structure (the number and arrangement of parts and holes).

def _in_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of points (u, v) against polygon `verts` (K, 2); vectorised over points."""
    inside = np.zeros(u.shape, dtype=bool)
    x1, y1 = verts[:, 0], verts[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for k in range(len(verts)):
        if y1[k] == y2[k]:
            continue
        crosses = (y1[k] > v) != (y2[k] > v)
        x_at = x1[k] + (v - y1[k]) * (x2[k] - x1[k]) / (y2[k] - y1[k])
        inside ^= crosses & (u < x_at)
    return inside


def _disc(u, v, x: float, y: float, r: float) -> np.ndarray:
    return (u - x) ** 2 + (v - y) ** 2 <= r * r


def _rect(u, v, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


def _star_verts(points: int, inner: float) -> np.ndarray:
    a = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _dumbbell(u, v, p):  # two discs joined by a bar
    c, r, t = p["spread"], p["bell"], p["bar"]
    return _disc(u, v, -c, 0, r) | _disc(u, v, c, 0, r) | _rect(u, v, -c, -t, c, t)


def _lollipop(u, v, p):  # a round head on one straight stick
    r, t = p["head"], p["stick"]
    return _disc(u, v, 0, r - 1, r) | _rect(u, v, -t, 0, t, 1)


def _cross(u, v, p):  # four equal arms
    t = p["arm"]
    return _rect(u, v, -t, -0.95, t, 0.95) | _rect(u, v, -0.95, -t, 0.95, t)


def _tee(u, v, p):  # a bar on top of a stem of the same length
    t = p["arm"]
    return _rect(u, v, -0.8, -0.8, 0.8, -0.8 + 2 * t) | _rect(u, v, -t, -0.8, t, 0.8)


def _ring(u, v, p):  # a disc with one round hole
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= p["inner"] ** 2)


def _horseshoe(u, v, p):  # a ring with a gap
    return _ring(u, v, p) & (np.abs(np.arctan2(u, v)) > p["gap"])


def _star(u, v, p):  # five spikes
    return _in_polygon(u, v, _star_verts(5, p["inner"]))


def _flower(u, v, p):  # a disc with six round petals
    a = p["turn"] + 2 * np.pi * np.arange(6) / 6
    inside = _disc(u, v, 0, 0, 0.4)
    for x, y in zip(0.66 * np.cos(a), 0.66 * np.sin(a)):
        inside |= _disc(u, v, x, y, p["petal"])
    return inside


def _arrow(u, v, p):  # a shaft with a triangular head
    t, w = p["shaft"], p["head"]
    return _in_polygon(u, v, np.array([(-1, -t), (0.2, -t), (0.2, -w), (1, 0), (0.2, w), (0.2, t), (-1, t)]))


def _house(u, v, p):  # a square body under a triangular roof, with a door cut out of the body
    d = p["door"]
    body = _rect(u, v, -0.6, -0.05, 0.6, 0.85) & ~_rect(u, v, -d, 0.35, d, 0.9)
    return body | _in_polygon(u, v, np.array([(-0.85, -0.05), (0.85, -0.05), (0.0, -0.9)]))


def _frame(u, v, p):  # a square with a square hole
    outer, inner = 0.78, p["inner"]
    return _rect(u, v, -outer, -outer, outer, outer) & ~_rect(u, v, -inner, -inner, inner, inner)


def _fork(u, v, p):  # a stem, a crossbar and three prongs
    t = p["tine"]
    inside = _rect(u, v, -t, 0.0, t, 1.0) | _rect(u, v, -0.6, -0.12, 0.6, 0.08)
    for x in (-0.6 + t, 0.0, 0.6 - t):
        inside |= _rect(u, v, x - t, -0.95, x + t, 0.0)
    return inside


@dataclass(frozen=True)
class _Shape:
    inside: Callable  # (u, v, params) -> bool array
    params: Callable = lambda rng: {}  # rng -> this instance's proportions


_CLASS_SHAPES: dict[str, _Shape] = {
    "dumbbell": _Shape(_dumbbell, lambda rng: {"spread": rng.uniform(0.55, 0.65), "bell": rng.uniform(0.3, 0.38),
                                               "bar": rng.uniform(0.09, 0.15)}),
    "lollipop": _Shape(_lollipop, lambda rng: {"head": rng.uniform(0.45, 0.55), "stick": rng.uniform(0.08, 0.12)}),
    "cross": _Shape(_cross, lambda rng: {"arm": rng.uniform(0.18, 0.28)}),
    "tee": _Shape(_tee, lambda rng: {"arm": rng.uniform(0.16, 0.24)}),
    "ring": _Shape(_ring, lambda rng: {"inner": rng.uniform(0.45, 0.65)}),
    "horseshoe": _Shape(_horseshoe, lambda rng: {"inner": rng.uniform(0.42, 0.58), "gap": rng.uniform(0.4, 0.7)}),
    "star": _Shape(_star, lambda rng: {"inner": rng.uniform(0.38, 0.5)}),
    "flower": _Shape(_flower, lambda rng: {"petal": rng.uniform(0.26, 0.33), "turn": rng.uniform(0, np.pi / 3)}),
    "arrow": _Shape(_arrow, lambda rng: {"shaft": rng.uniform(0.14, 0.24), "head": rng.uniform(0.5, 0.65)}),
    "house": _Shape(_house, lambda rng: {"door": rng.uniform(0.12, 0.2)}),
    "frame": _Shape(_frame, lambda rng: {"inner": rng.uniform(0.4, 0.55)}),
    "fork": _Shape(_fork, lambda rng: {"tine": rng.uniform(0.08, 0.11)}),
}
assert tuple(_CLASS_SHAPES) == SYNTHETIC_CLASSES


# Clutter: plain bodies without the parts that define a class. They are drawn from the same texture bank
# and scale range as objects, occlude them and are occluded by them, and are labelled background.

def _clutter_ellipse(u, v, p):
    return u * u + (v / p["minor"]) ** 2 <= 1.0


def _clutter_blob(u, v, p):  # a smooth random outline: radius 0.75 x (1 + a few low harmonics)
    theta, rad = np.arctan2(v, u), np.sqrt(u * u + v * v)
    outline = 1.0 + sum(a * np.cos(k * theta + ph) for k, a, ph in zip((2, 3, 4), p["amp"], p["phase"]))
    return rad <= 0.75 * outline


def _clutter_polygon(u, v, p):  # an irregular polygon, its vertices at random angles and radii
    return _in_polygon(u, v, p["verts"])


def _clutter_bar(u, v, p):  # a rectangle, from a square to a thin bar
    return _rect(u, v, -0.9, -0.9 * p["aspect"], 0.9, 0.9 * p["aspect"])


def _polygon_params(rng: np.random.Generator) -> dict:
    n = int(rng.integers(3, 8))
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.55, 1.0, n)
    return {"verts": np.stack([r * np.cos(a), r * np.sin(a)], axis=1)}


_CLUTTER_SHAPES: tuple[_Shape, ...] = (
    _Shape(_clutter_ellipse, lambda rng: {"minor": rng.uniform(0.35, 1.0)}),
    _Shape(_clutter_blob, lambda rng: {"amp": rng.uniform(0, 0.15, 3), "phase": rng.uniform(0, 2 * np.pi, 3)}),
    _Shape(_clutter_polygon, _polygon_params),
    _Shape(_clutter_bar, lambda rng: {"aspect": rng.uniform(0.15, 1.0)}),
)


# ---------------------------------------------------------------------------------------------- textures
# The one bank every object draws from, whatever its class. Each texture maps window pixel coords (x, y:
# image frame) and object-local coords (u, v) to RGB (h, w, 3), in the object's two colours c1, c2.

def _two_tone(t: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    return c1 + (c2 - c1) * t[..., None].astype(np.float32)


def _tex_solid(x, y, u, v, r, rng, c1, c2):
    shade = 1.0 - 0.35 * np.clip(u * u + v * v, 0, 1)  # radial shading, like a lit sphere
    return c1 * shade[..., None].astype(np.float32)


def _tex_stripes(x, y, u, v, r, rng, c1, c2):
    a = rng.uniform(0, np.pi)
    period = rng.uniform(5.0, 10.0) * max(r / 30.0, 0.6)
    s = np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period + rng.uniform(0, 2 * np.pi))
    return _two_tone(np.clip(s * 2.0 + 0.5, 0, 1), c1, c2)  # soft-edged stripes


def _tex_checker(x, y, u, v, r, rng, c1, c2):
    n = rng.uniform(2.0, 3.5)  # checks per unit radius, in the object frame
    return _two_tone((np.floor(u * n) + np.floor(v * n)) % 2, c1, c2)


def _tex_dots(x, y, u, v, r, rng, c1, c2):
    n = rng.uniform(2.5, 4.0)
    du, dv = (u * n) % 1 - 0.5, (v * n) % 1 - 0.5
    return _two_tone(du * du + dv * dv < 0.09, c1, c2)


def _tex_blotches(x, y, u, v, r, rng, c1, c2):
    h, w = x.shape
    small = rng.random((max(2, h // 6), max(2, w // 6))).astype(np.float32)  # smooth blotches
    t = ndimage.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1)[:h, :w]
    t = np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1])), mode="edge")
    return _two_tone(t, c1, c2)


def _tex_gradient(x, y, u, v, r, rng, c1, c2):
    a = rng.uniform(0, 2 * np.pi)
    return _two_tone(np.clip(0.5 + 0.5 * (u * np.cos(a) + v * np.sin(a)), 0, 1), c1, c2)


def _tex_grain(x, y, u, v, r, rng, c1, c2):
    return _two_tone(rng.random(x.shape) ** 2, c1, c2)  # per-pixel speckle


def _tex_concentric(x, y, u, v, r, rng, c1, c2):
    k = rng.uniform(3.0, 5.0)
    return _two_tone(0.5 + 0.5 * np.sin(2 * np.pi * k * np.sqrt(u * u + v * v)), c1, c2)


def _tex_chevron(x, y, u, v, r, rng, c1, c2):
    k = rng.uniform(2.0, 3.5)
    return _two_tone(((u + np.abs(v)) * k) % 1 < 0.5, c1, c2)


def _tex_plaid(x, y, u, v, r, rng, c1, c2):
    k = rng.uniform(2.5, 4.0)
    return _two_tone(((u * k) % 1 < 0.25) | ((v * k) % 1 < 0.25), c1, c2)


def _tex_pink(x, y, u, v, r, rng, c1, c2):
    return _two_tone(_pink_noise(rng, *x.shape, rng.uniform(1.6, 2.6)), c1, c2)


def _tex_photo(x, y, u, v, r, rng, c1, c2):  # a patch of a bundled photo, tinted towards c1
    return 0.6 * _photo_crop(rng, *x.shape) + 0.4 * c1


_TEXTURES: tuple[Callable, ...] = (
    _tex_solid, _tex_stripes, _tex_checker, _tex_dots, _tex_blotches, _tex_gradient,
    _tex_grain, _tex_concentric, _tex_chevron, _tex_plaid, _tex_pink, _tex_photo,
)


def _object_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.15, 1.0))


# ------------------------------------------------------------------------------------------- rendering

@dataclass
class _Object:
    cls: int  # index into SYNTHETIC_CLASSES
    truncated: bool
    area: int  # rendered pixels before occlusion (inside the image)


def _paint_shape(rng: np.random.Generator, shape: _Shape, image: np.ndarray) -> tuple[np.ndarray, slice, slice, bool] | None:
    """Paint one randomly placed, scaled, rotated and textured `shape` over `image` (in place).

    Returns (drawn pixels: bool (h, w) window, its rows, its cols, truncated by the border), or None when
    nothing of it lands inside the image.
    """
    size = image.shape[0]
    r = size * math.exp(rng.uniform(math.log(MIN_RADIUS), math.log(MAX_RADIUS)))  # log-uniform radius
    cx, cy = rng.uniform(0.05, 0.95) * size, rng.uniform(0.05, 0.95) * size
    theta = rng.uniform(0, 2 * np.pi)
    stretch = rng.uniform(0.85, 1.15)  # mild anisotropy
    params = shape.params(rng)
    # window around the object (unclipped, so truncation can be detected), in whole pixels
    ext = 1.2 * r * max(stretch, 1 / stretch)
    x0, x1 = int(math.floor(cx - ext)), int(math.ceil(cx + ext))
    y0, y1 = int(math.floor(cy - ext)), int(math.ceil(cy + ext))
    cos, sin = math.cos(theta), math.sin(theta)

    def local(x, y):  # image coords -> object-local (u, v)
        dx, dy = x - cx, y - cy
        return (dx * cos + dy * sin) / (r * stretch), (-dx * sin + dy * cos) * stretch / r

    # 2x2 supersampling for anti-aliased edges; mask = at least half the samples inside
    ss = (np.arange(2 * (x1 - x0)) + 0.5) / 2 + x0, (np.arange(2 * (y1 - y0)) + 0.5) / 2 + y0
    u2, v2 = local(*np.meshgrid(*ss))
    hit = shape.inside(u2, v2, params).reshape(y1 - y0, 2, x1 - x0, 2)
    alpha_full = hit.mean(axis=(1, 3), dtype=np.float32)  # (h, w) window
    drawn_full = alpha_full >= 0.5
    # clip the window to the image
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    crop = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    alpha, drawn = alpha_full[crop], drawn_full[crop]
    if not drawn.any():
        return None
    truncated = int(drawn.sum()) < int(drawn_full.sum())
    # texture and colours from the shared bank, on the clipped window at pixel centres
    xs, ys = np.meshgrid(np.arange(cx0, cx1) + 0.5, np.arange(cy0, cy1) + 0.5)
    u, v = local(xs, ys)
    texture = _TEXTURES[rng.integers(len(_TEXTURES))]
    tex = texture(xs, ys, u, v, r, rng, _object_colour(rng), _object_colour(rng)).astype(np.float32)
    # directional lighting and a little sensor noise, so objects are not flat cartoon colours
    a = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.0, 0.25) * np.clip(u * np.cos(a) + v * np.sin(a), -1, 1)
    tex = tex * light[..., None] + rng.normal(0, 0.02, size=tex.shape).astype(np.float32)
    region = image[cy0:cy1, cx0:cx1]
    region += alpha[..., None] * (np.clip(tex, 0, 1) - region)  # (h, w, 3) alpha blend, in place
    return drawn, slice(cy0, cy1), slice(cx0, cx1), truncated


def _boundary_band(inst: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ~width/2 of a boundary between different labels of `inst` -> bool (H, W)."""
    lo = ndimage.minimum_filter(inst, size=width + 1, mode="nearest")
    hi = ndimage.maximum_filter(inst, size=width + 1, mode="nearest")
    return lo != hi


def _annotate(objects: Sequence[_Object | None], inst: np.ndarray, band: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Class mask uint8 (H, W) and the annotated objects, from which object is visible where (`inst`)."""
    mask = np.zeros(inst.shape, dtype=np.uint8)
    annotated = []
    for k, obj in enumerate(objects):
        if obj is None:
            continue
        visible = inst == k
        n_vis = int(visible.sum())
        n_interior = int((visible & ~band).sum())
        if n_vis < MIN_VISIBLE_FRACTION * obj.area or n_interior < MIN_VISIBLE_PIXELS:
            mask[visible] = VOID  # too little left to tell its class: neither object nor background
            continue
        mask[visible] = obj.cls + 1
        rows, cols = np.nonzero(visible.any(axis=1))[0], np.nonzero(visible.any(axis=0))[0]
        xmin, xmax, ymin, ymax = int(cols[0]) + 1, int(cols[-1]) + 1, int(rows[0]) + 1, int(rows[-1]) + 1
        box_area = (xmax - xmin + 1) * (ymax - ymin + 1)
        annotated.append({
            "name": SYNTHETIC_CLASSES[obj.cls], "cls": obj.cls + 1, "truncated": int(obj.truncated),
            "difficult": int(box_area < DIFFICULT_BOX_AREA), "bbox": (xmin, ymin, xmax, ymax),
        })
    mask[band] = VOID
    return mask, annotated


def render_scene(seed: int, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene from its own seed -> (image uint8 (H, W, 3), mask uint8 (H, W), annotated objects).

    Objects are dicts with `name`, `cls` (1-based mask index), `truncated`, `difficult` and `bbox`
    (xmin, ymin, xmax, ymax) 1-based inclusive as in VOC XML, in painting (back-to-front) order. Every
    scene has at least one annotated object: if occlusion hid them all, one more is painted on top.
    """
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    inst = np.full((size, size), -1, dtype=np.int16)  # which object is visible at each pixel; -1 = bg/clutter
    n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    n_clutter = int(rng.integers(MIN_CLUTTER, MAX_CLUTTER + 1))
    # painting order: objects (their class) and clutter (-1) interleaved at random, back to front
    order = rng.permutation(np.r_[rng.integers(len(SYNTHETIC_CLASSES), size=n_objects), np.full(n_clutter, -1)])
    objects: list[_Object | None] = []
    band = np.zeros((size, size), dtype=bool)
    for _ in range(4):
        for cls in order.tolist():
            if cls < 0:
                painted = _paint_shape(rng, _CLUTTER_SHAPES[rng.integers(len(_CLUTTER_SHAPES))], image)
                if painted is not None:
                    drawn, rows, cols, _ = painted
                    inst[rows, cols][drawn] = -1  # clutter hides what is behind it
                continue
            painted = _paint_shape(rng, _CLASS_SHAPES[SYNTHETIC_CLASSES[cls]], image)
            if painted is None:
                objects.append(None)
                continue
            drawn, rows, cols, truncated = painted
            inst[rows, cols][drawn] = len(objects)
            objects.append(_Object(cls=cls, truncated=truncated, area=int(drawn.sum())))
        band = _boundary_band(inst, width=max(2, round(size / 96)))
        mask, annotated = _annotate(objects, inst, band)
        if annotated:
            break
        order = rng.integers(len(SYNTHETIC_CLASSES), size=1)  # all hidden: paint one more object on top
    image += rng.normal(0, 0.01, size=image.shape).astype(np.float32)  # global sensor noise
    image8 = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image8, mask, annotated


# ------------------------------------------------------------------------------------------------ writing

def _annotation_xml(image_id: str, size: int, objects: Sequence[dict]) -> str:
    lines = [
        "<annotation>",
        "\t<folder>VOC2007</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>ctxenc built-in synthetic</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{size}</width>",
        f"\t\t<height>{size}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>1</segmented>",
    ]
    for o in objects:
        xmin, ymin, xmax, ymax = o["bbox"]
        lines += [
            "\t<object>",
            f"\t\t<name>{o['name']}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{o['truncated']}</truncated>",
            f"\t\t<difficult>{o['difficult']}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _image_id(i: int) -> str:
    return f"{i + 1:06d}"


def _write_chunk(args: tuple[str, list[int], int, int]) -> list[tuple[str, list[tuple[str, int]]]]:
    """Render and write images `indices`; returns (id, [(class name, difficult)]) per image."""
    voc_dir, indices, size, seed = args
    voc = Path(voc_dir)
    palette = voc_palette()
    out = []
    for i in indices:
        image_id = _image_id(i)
        image, mask, objects = render_scene(seed * 1_000_003 + i, size)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY)
        png = Image.fromarray(mask)  # mode "L"; putpalette turns it into "P" keeping the indices
        png.putpalette(palette)
        buf = io.BytesIO()
        png.save(buf, format="PNG")
        (voc / "SegmentationClass" / f"{image_id}.png").write_bytes(buf.getvalue())
        (voc / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(image_id, size, objects))
        out.append((image_id, [(o["name"], o["difficult"]) for o in objects]))
    return out


def _split_ids(ids: Sequence[str], seed: int) -> dict[str, list[str]]:
    """Deterministic 70/10/20 train/val/test partition of `ids` (each list sorted), plus trainval."""
    order = np.random.default_rng([seed, 2007]).permutation(len(ids))
    n_train = round(SPLIT_FRACTIONS["train"] * len(ids))
    n_val = round(SPLIT_FRACTIONS["val"] * len(ids))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    splits = {k: sorted(ids[j] for j in idx) for k, idx in parts.items()}
    splits["trainval"] = sorted(splits["train"] + splits["val"])
    return splits


def generate_voc_dataset(out_dir: str | Path, num_images: int = 2000, size: int = 256, seed: int = 0,
                         workers: int = 2) -> GenerationStats:
    """Render `num_images` scenes into `out_dir/VOC2007/` in the standard Pascal VOC layout.

    Output is byte-identical for the same (num_images, size, seed) whatever `workers` is.
    """
    t0 = time.perf_counter()
    if num_images < 1 or size < 32:
        raise ValueError(f"need num_images >= 1 and size >= 32, got num_images={num_images} size={size}")
    voc = Path(out_dir) / "VOC2007"
    if voc.exists():
        raise FileExistsError(f"{voc} already exists; delete it or pick another out_dir")
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)

    chunk = 25
    jobs = [(str(voc), list(range(s, min(s + chunk, num_images))), size, seed)
            for s in range(0, num_images, chunk)]
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        results = [r for job in jobs for r in _write_chunk(job)]
    else:
        _load_sources()  # load once in the parent; forked workers inherit it
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            results = [r for part in pool.imap(_write_chunk, jobs) for r in part]

    ids = [image_id for image_id, _ in results]
    splits = _split_ids(ids, seed)
    objects = dict(results)
    for split, members in splits.items():
        text = "".join(f"{m}\n" for m in members)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text(text)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(text)
        for name in SYNTHETIC_CLASSES:
            lines = []
            for m in members:
                flags = [d for n, d in objects[m] if n == name]
                # VOC convention: 1 present, -1 absent, 0 only difficult instances
                label = -1 if not flags else (0 if all(flags) else 1)
                lines.append(f"{m} {label:2d}\n")
            (voc / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("".join(lines))
    (voc / "labels.txt").write_text("".join(f"{n}\n" for n in ("background", *SYNTHETIC_CLASSES)))
    num_objects = sum(len(o) for o in objects.values())
    return GenerationStats(num_images=num_images, num_objects=num_objects, seconds=time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    """`$CTXENC_DATA_CACHE` if set, else `~/.cache/ctxenc`."""
    env = os.environ.get("CTXENC_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ctxenc"


_STALE_TMP_SECONDS = 6 * 3600


def builtin_voc_root(cache_dir: str | Path | None = None, num_images: int = 2000, size: int = 256,
                     seed: int = EVALUATION_SEED, workers: int = 2) -> Path:
    """Root folder (containing `VOC2007/`) of the built-in dataset; generated on first use.

    Safe under concurrency and crashes: generation happens in a temporary folder under an exclusive lock,
    `DONE` (a JSON manifest of the parameters) is written last, then the folder is renamed into place.
    A folder without `DONE` is never returned.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"builtin-v{GENERATOR_VERSION}-n{num_images}-s{size}-seed{seed}"
    root = cache / name
    if (root / "DONE").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent caller waits here, then finds DONE
        if (root / "DONE").is_file():
            return root
        _remove_stale_tmp(cache)
        if root.exists():  # no DONE: not ours to trust (e.g. copied by hand, half-deleted); move it aside
            trash = cache / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(root, trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp = cache / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        print(f"generating built-in dataset ({num_images} images, {size}x{size}, seed {seed}) in {root} ...",
              flush=True)
        try:
            stats = generate_voc_dataset(tmp, num_images=num_images, size=size, seed=seed, workers=workers)
            manifest = {"generator_version": GENERATOR_VERSION, "num_images": num_images, "size": size,
                        "seed": seed, "classes": list(SYNTHETIC_CLASSES), "num_objects": stats.num_objects,
                        "seconds": round(stats.seconds, 2)}
            (tmp / "DONE").write_text(json.dumps(manifest, indent=1) + "\n")
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"built-in dataset ready: {stats.num_objects} objects in {stats.seconds:.1f} s", flush=True)
    return root


def builtin_pretraining_root(cache_dir: str | Path | None = None, num_images: int = 2000, size: int = 256,
                             workers: int = 2) -> Path:
    """Root folder of the built-in *labelled pretraining* set; generated on first use.

    The same generator, classes, size and split sizes as the evaluation set (`builtin_voc_root`), from
    another seed, so a network pretrained with its labels has never seen an image it is evaluated on.
    That is checked, not assumed: a JPEG file whose bytes also occur in the evaluation set of the same
    size raises ValueError.
    """
    root = builtin_voc_root(cache_dir, num_images, size, seed=PRETRAINING_SEED, workers=workers)
    evaluation = builtin_voc_root(cache_dir, num_images, size, seed=EVALUATION_SEED, workers=workers)
    shared = image_hashes(root).keys() & image_hashes(evaluation).keys()
    if shared:
        raise ValueError(f"{root}: {len(shared)} image(s) are byte-identical to images of the evaluation set "
                         f"{evaluation}. Fix: delete both folders so they are generated again.")
    return root


def image_hashes(root: str | Path) -> dict[str, Path]:
    """SHA-256 of every file in `<root>/VOC2007/JPEGImages` -> its path."""
    folder = Path(root) / "VOC2007" / "JPEGImages"
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in sorted(folder.iterdir()) if p.is_file()}


def _remove_stale_tmp(cache: Path) -> None:
    """Delete temporary folders left by crashed generations (old enough that nobody is writing them)."""
    now = time.time()
    for p in cache.glob(".tmp-builtin-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
