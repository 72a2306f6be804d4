"""Deterministic renderers: a scene (slots of concepts) -> a raw input tensor, per modality.

A scene is a tuple of ``N_SLOTS`` ints: a concept index, or ``-1`` for an empty slot. The slot
order is the modality's natural order (image: quadrants in reading order; audio: time segments;
video: frame pairs over time; point cloud: four places on the ground plane, in reading order).
Every renderer takes a ``numpy.random.Generator`` for its noise, so ``(scene, seed)`` fixes the
output exactly.

Shapes of the raw inputs (float32):
  image [3, 32, 32]; audio [2048] (a waveform; the spectral front end is in the encoder);
  video [8, 3, 16, 16]; point [192, 6] (xyz + rgb).
Capability-family images are [3, 32, 32] as well (:func:`render_capability`).
"""
from __future__ import annotations

import math

import numpy as np

from .concepts import (CAP_CHARS, CAP_COLORS, CAP_SHAPES, CAP_SIDES, N_CONCEPTS, N_SLOTS)

IMAGE_SIZE = 32
AUDIO_LEN = 2048
AUDIO_SEG = AUDIO_LEN // N_SLOTS
VIDEO_FRAMES = 8
VIDEO_SIZE = 16
N_POINTS = 192

RAW_SHAPES: dict[str, tuple[int, ...]] = {
    "image": (3, IMAGE_SIZE, IMAGE_SIZE),
    "audio": (AUDIO_LEN,),
    "video": (VIDEO_FRAMES, 3, VIDEO_SIZE, VIDEO_SIZE),
    "point": (N_POINTS, 6),
}

_PALETTE3 = np.array([[0.9, 0.15, 0.1], [0.1, 0.8, 0.2], [0.15, 0.3, 0.95]], dtype=np.float32)
_CAP_RGB = np.array([[0.9, 0.1, 0.1], [0.1, 0.75, 0.15], [0.1, 0.25, 0.95], [0.95, 0.85, 0.1]],
                    dtype=np.float32)


def _shape_mask(kind: int, size: int, angle: float = 0.0) -> np.ndarray:
    """Binary [size, size] mask: 0 disk, 1 square, 2 triangle, 3 cross."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    y, x = (yy - c) / (size / 2.0), (xx - c) / (size / 2.0)
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        x, y = ca * x - sa * y, sa * x + ca * y
    if kind == 0:
        m = x * x + y * y <= 0.9
    elif kind == 1:
        m = (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    elif kind == 2:
        m = (y <= 0.8) & (y >= -0.9 + 1.9 * np.abs(x))
    else:
        m = ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 0.95))
    return m.astype(np.float32)


# ----------------------------------------------------------------------------- modality renderers
def render_image(scene: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Concept k = shape ``k % 4`` in colour ``k // 4``, drawn in its quadrant with jitter."""
    img = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    img[:] = rng.uniform(0.0, 0.25, size=(3, 1, 1)).astype(np.float32)
    half = IMAGE_SIZE // 2
    for slot, k in enumerate(scene):
        if k < 0:
            continue
        size = int(rng.integers(9, 13))
        oy = (slot // 2) * half + int(rng.integers(0, half - size + 1))
        ox = (slot % 2) * half + int(rng.integers(0, half - size + 1))
        m = _shape_mask(k % 4, size)
        col = _PALETTE3[k // 4] * rng.uniform(0.8, 1.1)
        img[:, oy:oy + size, ox:ox + size] = (img[:, oy:oy + size, ox:ox + size] * (1 - m)
                                              + col[:, None, None] * m)
    img += rng.normal(0.0, 0.08, size=img.shape).astype(np.float32)
    return img


def _audio_tones() -> np.ndarray:
    """[N_CONCEPTS, 2] frequencies (in STFT-bin units of a 64-point FFT), fixed forever."""
    r = np.random.default_rng(20240611)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < N_CONCEPTS:
        a, b = sorted(int(v) for v in r.choice(np.arange(3, 30), size=2, replace=False))
        if b - a >= 3 and (a, b) not in pairs:
            pairs.append((a, b))
    return np.array(pairs, dtype=np.float32)


AUDIO_TONES = _audio_tones()


def render_audio(scene: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Concept k = a two-tone chord (fixed bins), played in its time segment with an envelope."""
    wav = rng.normal(0.0, 0.25, size=AUDIO_LEN).astype(np.float32)
    t = np.arange(AUDIO_SEG, dtype=np.float32)
    env = np.sin(np.pi * t / AUDIO_SEG) ** 0.5
    for slot, k in enumerate(scene):
        if k < 0:
            continue
        f = (AUDIO_TONES[k] + rng.uniform(-0.25, 0.25, size=2)) / 64.0  # cycles per sample
        ph = rng.uniform(0, 2 * np.pi, size=2)
        amp = rng.uniform(0.7, 1.0)
        seg = amp * env * (np.sin(2 * np.pi * f[0] * t + ph[0]) + 0.8 * np.sin(2 * np.pi * f[1] * t + ph[1]))
        wav[slot * AUDIO_SEG:(slot + 1) * AUDIO_SEG] += seg.astype(np.float32)
    return wav


_VIDEO_DIRS = np.array([[0, 1], [0, -1], [1, 0], [-1, 0]])  # (dy, dx): right, left, down, up


def render_video(scene: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Concept k = a 5x5 sprite in colour ``k % 3`` moving in direction ``k // 3`` for two frames.

    Slot s occupies frames 2s and 2s+1; an empty slot shows only background noise.
    """
    vid = np.empty((VIDEO_FRAMES, 3, VIDEO_SIZE, VIDEO_SIZE), dtype=np.float32)
    vid[:] = rng.uniform(0.0, 0.25, size=(1, 3, 1, 1)).astype(np.float32)
    s = 5
    for slot, k in enumerate(scene):
        if k < 0:
            continue
        dy, dx = _VIDEO_DIRS[k // 3]
        col = _PALETTE3[k % 3] * rng.uniform(0.8, 1.1)
        y0 = int(rng.integers(4, VIDEO_SIZE - s - 4 + 1))
        x0 = int(rng.integers(4, VIDEO_SIZE - s - 4 + 1))
        for j in range(2):
            y, x = y0 + dy * 4 * j - dy * 2, x0 + dx * 4 * j - dx * 2
            vid[2 * slot + j, :, y:y + s, x:x + s] = col[:, None, None]
    vid += rng.normal(0.0, 0.08, size=vid.shape).astype(np.float32)
    return vid


_POINT_CENTERS = np.array([[-0.5, 0.5], [0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]], dtype=np.float32)
_POINT_RGB = np.array([[0.9, 0.3, 0.1], [0.1, 0.5, 0.9]], dtype=np.float32)


def _sample_shape(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points on the surface of a unit-ish 3-D shape: sphere, cube, cylinder, cone, torus, disc."""
    u, v = rng.uniform(0, 1, size=n), rng.uniform(0, 1, size=n)
    th = 2 * np.pi * u
    if kind == 0:  # sphere
        z = 2 * v - 1
        r = np.sqrt(1 - z * z)
        p = np.stack([r * np.cos(th), r * np.sin(th), z], 1)
    elif kind == 1:  # cube surface
        p = rng.uniform(-0.8, 0.8, size=(n, 3))
        ax = rng.integers(0, 3, size=n)
        p[np.arange(n), ax] = np.sign(rng.uniform(-1, 1, size=n)) * 0.8
    elif kind == 2:  # cylinder (tall)
        p = np.stack([0.6 * np.cos(th), 0.6 * np.sin(th), 2 * v - 1], 1)
    elif kind == 3:  # cone
        h = np.sqrt(v)
        p = np.stack([h * np.cos(th), h * np.sin(th), 1 - 2 * h], 1)
    elif kind == 4:  # torus
        ph = 2 * np.pi * v
        p = np.stack([(0.75 + 0.25 * np.cos(ph)) * np.cos(th), (0.75 + 0.25 * np.cos(ph)) * np.sin(th),
                      0.25 * np.sin(ph)], 1)
    else:  # flat disc
        r = np.sqrt(v)
        p = np.stack([r * np.cos(th), r * np.sin(th), np.zeros(n)], 1)
    return p.astype(np.float32)


def render_point(scene: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Concept k = shape ``k % 6`` with colour ``k // 6``, at its place on the ground plane.

    Points are shared evenly among the objects; row order is shuffled (a set, not a sequence).
    """
    ks = [(slot, k) for slot, k in enumerate(scene) if k >= 0]
    counts = np.full(len(ks), N_POINTS // len(ks))
    counts[: N_POINTS - counts.sum()] += 1
    parts = []
    for (slot, k), n in zip(ks, counts):
        p = _sample_shape(k % 6, int(n), rng) * rng.uniform(0.25, 0.32)
        p[:, :2] += _POINT_CENTERS[slot] + rng.uniform(-0.08, 0.08, size=2)
        p += rng.normal(0, 0.01, size=p.shape)
        rgb = np.clip(_POINT_RGB[k // 6] + rng.normal(0, 0.08, size=(int(n), 3)), 0, 1)
        parts.append(np.concatenate([p, rgb], 1))
    pts = np.concatenate(parts, 0).astype(np.float32)
    return pts[rng.permutation(len(pts))]


RENDERERS = {"image": render_image, "audio": render_audio, "video": render_video, "point": render_point}


def render(modality: str, scene: tuple[int, ...], seed: int) -> np.ndarray:
    """Render ``scene`` in ``modality`` with noise drawn from ``seed`` (deterministic)."""
    if modality not in RENDERERS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(RENDERERS)}")
    if not any(k >= 0 for k in scene):
        raise ValueError(f"scene {scene} is empty")
    return RENDERERS[modality](tuple(int(k) for k in scene), np.random.default_rng(seed))


# ----------------------------------------------------------------------------- capability images
_FONT = {  # 3x5 digit glyphs, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111",
}


def _polygon_mask(n_sides: int, radius: float, angle: float, size: int = IMAGE_SIZE,
                  center: tuple[float, float] = (15.5, 15.5)) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = xx - center[1], yy - center[0]
    inside = np.ones((size, size), dtype=bool)
    apothem = radius * math.cos(math.pi / n_sides)
    for i in range(n_sides):
        a = angle + (2 * i + 1) * math.pi / n_sides
        inside &= (x * math.cos(a) + y * math.sin(a)) <= apothem
    return inside.astype(np.float32)


def render_capability(task: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One capability-family image and its ground truth (a dict; keys depend on the task).

    - ``vqa``/``grounding``: 2-3 coloured shapes in distinct cells of a 3x3 grid;
      truth ``objects = [(color, shape, row, col), ...]`` (shapes and colours distinct) and
      ``shape_patches`` ([(index in the 4x4 grid of 8x8 encoder patches of the object's centre, shape)]);
    - ``geometry``: one regular polygon, truth ``sides`` in 3..6;
    - ``chart``: four bars (one per colour, random order), truth ``bars = [(color, value)]``;
    - ``ocr``: three digits in a 3x5 font (6x5 px), one per encoder patch, truth ``text`` (a 3-char string)
      and ``glyph_patches`` ([(patch index in the 4x4 grid, digit)]).
    """
    img = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    img[:] = rng.uniform(0.0, 0.2, size=(3, 1, 1)).astype(np.float32)
    truth: dict = {"task": task}
    if task in ("vqa", "grounding"):
        n = int(rng.integers(2, 4))
        cells = rng.choice(9, size=n, replace=False)
        colors = rng.choice(len(CAP_COLORS), size=n, replace=False)
        shapes = rng.choice(len(CAP_SHAPES), size=n, replace=False)
        objs, centre = [], []
        for c, ci, si in zip(cells, colors, shapes):
            r, q = int(c) // 3, int(c) % 3
            size = int(rng.integers(7, 10))
            oy = r * 10 + 1 + int(rng.integers(0, 10 - size + 1))
            ox = q * 10 + 1 + int(rng.integers(0, 10 - size + 1))
            m = _shape_mask(int(si), size)
            img[:, oy:oy + size, ox:ox + size] = (img[:, oy:oy + size, ox:ox + size] * (1 - m)
                                                  + _CAP_RGB[ci][:, None, None] * m)
            objs.append((CAP_COLORS[ci], CAP_SHAPES[si], r, q))
            centre.append(((oy + size // 2) // 8 * 4 + (ox + size // 2) // 8, int(si)))
        truth["objects"] = objs
        truth["shape_patches"] = centre
    elif task == "geometry":
        sides = int(rng.integers(3, 7))
        m = _polygon_mask(sides, float(rng.uniform(10, 14)), float(rng.uniform(0, 2 * math.pi)),
                          center=(15.5 + rng.uniform(-1.5, 1.5), 15.5 + rng.uniform(-1.5, 1.5)))
        col = _CAP_RGB[int(rng.integers(0, 4))]
        img = img * (1 - m) + col[:, None, None] * m
        truth["sides"] = sides
    elif task == "chart":
        order = rng.permutation(4)
        vals = rng.integers(1, 8, size=4)
        img[:, 31, :] = 0.9  # axis
        bars = []
        for pos, ci in enumerate(order):
            h = int(vals[pos]) * 4
            x0 = 2 + pos * 8
            img[:, 31 - h:31, x0:x0 + 5] = _CAP_RGB[ci][:, None, None]
            bars.append((CAP_COLORS[ci], int(vals[pos])))
        truth["bars"] = bars
    elif task == "ocr":
        # one glyph (3x5 font, scaled 2x horizontally: 6x5 px) per 8x8 patch of the encoder, in three
        # adjacent patches of one patch row: a glyph never straddles two patch tokens, so reading
        # the string is learnable by a fine-tune of the LLM (with glyphs at any pixel offset the
        # 64-dim patch tokens mixed neighbouring digits and greedy OCR stayed at 0-1%)
        text = "".join(CAP_CHARS[int(i)] for i in rng.integers(0, 10, size=3))
        row, first = int(rng.integers(0, 4)), int(rng.integers(0, 2))
        y0 = row * 8 + 1 + int(rng.integers(0, 3))
        col = np.array([0.95, 0.95, 0.95], dtype=np.float32) * rng.uniform(0.8, 1.0)
        for j, ch in enumerate(text):
            g = np.array([int(b) for b in _FONT[ch]], dtype=np.float32).reshape(5, 3)
            g = np.kron(g, np.ones((1, 2), dtype=np.float32))
            ys, xs = y0, (first + j) * 8 + 1
            img[:, ys:ys + 5, xs:xs + 6] = img[:, ys:ys + 5, xs:xs + 6] * (1 - g) + col[:, None, None] * g
        truth["text"] = text
        truth["glyph_patches"] = [(row * 4 + first + j, int(ch)) for j, ch in enumerate(text)]
    else:
        raise ValueError(f"unknown capability task {task!r}")
    img = img + rng.normal(0.0, 0.06, size=img.shape).astype(np.float32)
    return img.astype(np.float32), truth


__all__ = ["RAW_SHAPES", "RENDERERS", "render", "render_image", "render_audio", "render_video",
           "render_point", "render_capability", "AUDIO_TONES", "CAP_SIDES"]
