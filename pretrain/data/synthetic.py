"""Built-in procedural dataset in Pascal-VOC layout, generated on first use (no downloads).

Each scene is a natural-statistics background (random, jittered crops of the photos bundled with
scikit-image / scikit-learn, mixed with 1/f noise) with 1-5 objects painted back to front. Every object
class has its own shape family *and* its own texture, so both shape and appearance carry class
information, as in real photos. Boxes and masks come from the rendered *visible* pixels, so occlusion is
handled exactly; masks carry a 255 "void" band around object boundaries like VOC's outlines.

Everything is deterministic from `seed`: image `i` uses its own generator seeded with
`seed * 1_000_003 + i`, so the output does not depend on the number of workers.

    root = builtin_voc_root()             # <cache>/builtin-v1-n2000-s256-seed0, contains VOC2007/
"""
from __future__ import annotations

import fcntl
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
GENERATOR_VERSION = 1

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "disc", "square", "triangle", "star", "ring", "cross",
    "ellipse", "hexagon", "crescent", "heart", "arrow", "diamond",
)

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
JPEG_QUALITY = 90
MIN_OBJECTS, MAX_OBJECTS = 1, 5
# Objects whose visible interior is tiny or mostly hidden are not annotated; their pixels become void (255).
MIN_VISIBLE_FRACTION = 0.05
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


def _photo_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random rescaled, flipped, colour-jittered crop of a bundled photo -> float32 (size, size, 3)."""
    sources = _load_sources()
    src = sources[rng.integers(len(sources))]
    h, w = src.shape[:2]
    side = rng.uniform(0.3, 1.0) * min(h, w)
    aspect = rng.uniform(0.8, 1.25)  # mild non-uniform rescale
    cw, ch = min(w, side * aspect), min(h, side / aspect)
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    pil = Image.fromarray(src).resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
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
        return _photo_crop(rng, size)
    if kind < 0.75:
        return _noise_background(rng, size)
    a = rng.uniform(0.25, 0.6)
    return (1 - a) * _photo_crop(rng, size) + a * _noise_background(rng, size)


# ---------------------------------------------------------------------------------------------- shapes
# Each shape is an inside test on object-local coordinates (u, v): the object's frame, rotated and scaled
# so the shape roughly fills the unit disc. `params` holds per-instance shape jitter.

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


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star_verts(inner: float) -> np.ndarray:
    a = -np.pi / 2 + np.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


_ARROW = np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)])


def _shape_disc(u, v, p):
    return u * u + v * v <= 1.0


def _shape_square(u, v, p):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.78


def _shape_triangle(u, v, p):
    return _in_polygon(u, v, _regular(3, 1.0, -np.pi / 2))


def _shape_star(u, v, p):
    return _in_polygon(u, v, _star_verts(p["inner"]))


def _shape_ring(u, v, p):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= p["inner"] ** 2)


def _shape_cross(u, v, p):
    au, av, t = np.abs(u), np.abs(v), p["arm"]
    return ((au <= t) & (av <= 1.0)) | ((av <= t) & (au <= 1.0))


def _shape_ellipse(u, v, p):
    return u * u + (v / p["minor"]) ** 2 <= 1.0


def _shape_hexagon(u, v, p):
    return _in_polygon(u, v, _regular(6, 1.0, 0.0))


def _shape_crescent(u, v, p):
    off, r = p["offset"], p["bite"]
    return (u * u + v * v <= 1.0) & ((u - off) ** 2 + v * v > r * r)


def _shape_heart(u, v, p):
    x, y = u * 1.25, -v * 1.25 + 0.15  # image v points down; the classic heart curve has y up
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _shape_arrow(u, v, p):
    return _in_polygon(u, v, _ARROW)


def _shape_diamond(u, v, p):
    return np.abs(u) + np.abs(v) / p["minor"] <= 1.0


# ---------------------------------------------------------------------------------------------- textures
# Each texture maps window pixel coords (x, y: image frame) and object-local coords (u, v) to RGB (h, w, 3).

def _two_tone(t: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    return c1 + (c2 - c1) * t[..., None].astype(np.float32)


def _stripes(angle_deg: float) -> Callable:
    """Stripes whose normal points at `angle_deg` in the image frame (0 = vertical stripes), +-8 deg."""
    def tex(x, y, u, v, r, rng, c1, c2):
        a = np.deg2rad(angle_deg + rng.uniform(-8, 8))
        period = rng.uniform(5.0, 10.0) * max(r / 30.0, 0.6)
        s = np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period + rng.uniform(0, 2 * np.pi))
        return _two_tone(np.clip(s * 2.0 + 0.5, 0, 1), c1, c2)  # soft-edged stripes
    return tex


def _tex_solid(x, y, u, v, r, rng, c1, c2):
    shade = 1.0 - 0.35 * np.clip(u * u + v * v, 0, 1)  # radial shading, like a lit sphere
    return c1 * shade[..., None].astype(np.float32)


def _tex_checker(x, y, u, v, r, rng, c1, c2):
    n = rng.uniform(2.0, 3.5)  # checks per unit radius, in the object frame
    t = (np.floor(u * n) + np.floor(v * n)) % 2
    return _two_tone(t, c1, c2)


def _tex_dots(x, y, u, v, r, rng, c1, c2):
    n = rng.uniform(2.5, 4.0)
    du, dv = (u * n) % 1 - 0.5, (v * n) % 1 - 0.5
    return _two_tone(du * du + dv * dv < 0.09, c1, c2)


def _tex_noise(x, y, u, v, r, rng, c1, c2):
    h, w = x.shape
    small = rng.random((max(2, h // 6), max(2, w // 6))).astype(np.float32)  # smooth blotches
    t = ndimage.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1)[:h, :w]
    t = np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1])), mode="edge")
    return _two_tone(t, c1, c2)


def _tex_gradient(x, y, u, v, r, rng, c1, c2):
    a = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + 0.5 * (u * np.cos(a) + v * np.sin(a)), 0, 1)
    return _two_tone(t, c1, c2)


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
    lines = ((u * k) % 1 < 0.25) | ((v * k) % 1 < 0.25)
    return _two_tone(lines, c1, c2)


@dataclass(frozen=True)
class _ClassSpec:
    shape: Callable
    texture: Callable
    hue: float  # centre of the class's hue range
    params: Callable = lambda rng: {}


_SPECS: dict[str, _ClassSpec] = {
    "disc": _ClassSpec(_shape_disc, _tex_solid, 0.0),
    "square": _ClassSpec(_shape_square, _tex_checker, 0.6),
    "triangle": _ClassSpec(_shape_triangle, _stripes(0.0), 0.15),
    "star": _ClassSpec(_shape_star, _tex_dots, 0.13, lambda rng: {"inner": rng.uniform(0.38, 0.5)}),
    "ring": _ClassSpec(_shape_ring, _tex_noise, 0.5, lambda rng: {"inner": rng.uniform(0.45, 0.65)}),
    "cross": _ClassSpec(_shape_cross, _stripes(45.0), 0.33, lambda rng: {"arm": rng.uniform(0.25, 0.35)}),
    "ellipse": _ClassSpec(_shape_ellipse, _tex_gradient, 0.75, lambda rng: {"minor": rng.uniform(0.4, 0.6)}),
    "hexagon": _ClassSpec(_shape_hexagon, _stripes(90.0), 0.08),
    "crescent": _ClassSpec(_shape_crescent, _tex_grain, 0.58,
                           lambda rng: {"offset": rng.uniform(0.4, 0.6), "bite": rng.uniform(0.75, 0.9)}),
    "heart": _ClassSpec(_shape_heart, _tex_concentric, 0.93),
    "arrow": _ClassSpec(_shape_arrow, _tex_chevron, 0.42),
    "diamond": _ClassSpec(_shape_diamond, _tex_plaid, 0.83, lambda rng: {"minor": rng.uniform(0.5, 0.7)}),
}
assert tuple(_SPECS) == SYNTHETIC_CLASSES


# ------------------------------------------------------------------------------------------- rendering

@dataclass
class _Object:
    cls: int  # index into SYNTHETIC_CLASSES
    truncated: bool
    area: int  # rendered pixels before occlusion (inside the image)


def _render_object(rng: np.random.Generator, cls: int, image: np.ndarray, inst: np.ndarray,
                   index: int) -> _Object | None:
    """Paint one object over `image` (in place) and write `index` into `inst` where it is drawn."""
    size = image.shape[0]
    spec = _SPECS[SYNTHETIC_CLASSES[cls]]
    r = size * math.exp(rng.uniform(math.log(0.06), math.log(0.3)))  # log-uniform radius
    cx, cy = rng.uniform(0.05, 0.95) * size, rng.uniform(0.05, 0.95) * size
    theta = rng.uniform(0, 2 * np.pi)
    stretch = rng.uniform(0.85, 1.15)  # mild anisotropy
    params = spec.params(rng)
    # window around the object (unclipped, so truncation can be detected), in whole pixels
    ext = 1.3 * r * max(stretch, 1 / stretch)
    x0, x1 = int(math.floor(cx - ext)), int(math.ceil(cx + ext))
    y0, y1 = int(math.floor(cy - ext)), int(math.ceil(cy + ext))
    cos, sin = math.cos(theta), math.sin(theta)

    def local(x, y):  # image coords -> object-local (u, v)
        dx, dy = x - cx, y - cy
        return (dx * cos + dy * sin) / (r * stretch), (-dx * sin + dy * cos) * stretch / r

    # 2x2 supersampling for anti-aliased edges; mask = at least half the samples inside
    ss = (np.arange(2 * (x1 - x0)) + 0.5) / 2 + x0, (np.arange(2 * (y1 - y0)) + 0.5) / 2 + y0
    u2, v2 = local(*np.meshgrid(*ss))
    hit = spec.shape(u2, v2, params).reshape(y1 - y0, 2, x1 - x0, 2)
    alpha_full = hit.mean(axis=(1, 3), dtype=np.float32)  # (h, w) window
    drawn_full = alpha_full >= 0.5
    # clip the window to the image
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    crop = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    alpha, drawn = alpha_full[crop], drawn_full[crop]
    area = int(drawn.sum())
    if area == 0:
        return None
    truncated = area < int(drawn_full.sum())
    # texture on the clipped window, at pixel centres
    xs, ys = np.meshgrid(np.arange(cx0, cx1) + 0.5, np.arange(cy0, cy1) + 0.5)
    u, v = local(xs, ys)
    hue = (spec.hue + rng.uniform(-0.06, 0.06)) % 1.0
    c1 = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    c2 = _hsv_to_rgb((hue + rng.uniform(-0.04, 0.04)) % 1.0, rng.uniform(0.3, 1.0), rng.uniform(0.05, 0.4))
    tex = spec.texture(xs, ys, u, v, r, rng, c1, c2).astype(np.float32)
    # directional lighting and a little sensor noise, so objects are not flat cartoon colours
    a = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.0, 0.25) * np.clip(u * np.cos(a) + v * np.sin(a), -1, 1)
    tex = tex * light[..., None] + rng.normal(0, 0.02, size=tex.shape).astype(np.float32)
    region = image[cy0:cy1, cx0:cx1]
    region += alpha[..., None] * (np.clip(tex, 0, 1) - region)  # (h, w, 3) alpha blend, in place
    inst[cy0:cy1, cx0:cx1][drawn] = index
    return _Object(cls=cls, truncated=truncated, area=area)


def _boundary_band(inst: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ~width/2 of a boundary between different labels of `inst` -> bool (H, W)."""
    lo = ndimage.minimum_filter(inst, size=width + 1, mode="nearest")
    hi = ndimage.maximum_filter(inst, size=width + 1, mode="nearest")
    return lo != hi


def render_scene(seed: int, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene from its own seed -> (image uint8 (H, W, 3), mask uint8 (H, W), annotated objects).

    Objects are dicts with `name`, `cls` (1-based mask index), `truncated`, `difficult` and `bbox`
    (xmin, ymin, xmax, ymax) 1-based inclusive as in VOC XML, in painting (back-to-front) order.
    """
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    inst = np.full((size, size), -1, dtype=np.int16)  # which object is visible at each pixel; -1 = bg
    objects: list[_Object | None] = []
    for k in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        objects.append(_render_object(rng, int(rng.integers(len(SYNTHETIC_CLASSES))), image, inst, k))
    image += rng.normal(0, 0.01, size=image.shape).astype(np.float32)  # global sensor noise
    image8 = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)

    band = _boundary_band(inst, width=max(2, round(size / 96)))
    mask = np.zeros((size, size), dtype=np.uint8)
    annotated = []
    for k, obj in enumerate(objects):
        if obj is None:
            continue
        visible = inst == k
        n_vis = int(visible.sum())
        n_interior = int((visible & ~band).sum())
        if n_vis < MIN_VISIBLE_FRACTION * obj.area or n_interior < MIN_VISIBLE_PIXELS:
            mask[visible] = VOID  # an unlabelled sliver: neither object nor background
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
                     seed: int = 0, workers: int = 2) -> Path:
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


def _remove_stale_tmp(cache: Path) -> None:
    """Delete temporary folders left by crashed generations (old enough that nobody is writing them)."""
    now = time.time()
    for p in cache.glob(".tmp-builtin-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
