"""Scenes of the synthetic GRES dataset: 2-6 coloured shapes on a textured background.

Each object has three attributes from a small closed vocabulary (shape, colour, size) and no two
objects of a scene share all three, so every object can be named unambiguously. Shapes are drawn
without anti-aliasing into a label map, so an object's mask is exactly the pixels painted in its
colour: later objects may hide part of earlier ones (partial occlusion), never more than
``1 - MIN_VISIBLE_FRACTION`` of them, and some are placed against another object (touching).
A darker one-pixel outline keeps touching objects of one colour apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
# Saturated colours far from each other and from the greyish backgrounds.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 85, 220),
    "yellow": (238, 205, 30),
    "purple": (145, 60, 185),
}
SIZES = ("big", "small")
ATTRIBUTE_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}

# Object "radius" as a fraction of the image side: two size classes far apart (area ratio ~2.7),
# the small one still ~30 px across at 160 px, so its shape is legible at the model's strides.
RADIUS_RANGE = {"small": (0.090, 0.105), "big": (0.150, 0.170)}
BIG_PROBABILITY = 0.4
NUM_OBJECTS_RANGE = (2, 6)
# How many colours / shape kinds one scene draws from (few, so attributes repeat and both
# multi-target groups and near-miss no-target expressions exist); weights of 2, 3, 4.
PALETTE_SIZE_WEIGHTS = (0.4, 0.4, 0.2)
MIN_VISIBLE_FRACTION = 0.65  # an occluded object keeps at least this share of its pixels
NEAR_PLACEMENT_PROBABILITY = 0.35  # objects put against another one (touching / overlapping)
PLACEMENT_TRIES = 40
EXTENT = 1.35  # every shape fits in a circle of EXTENT * radius around its centre
OUTLINE_DARKNESS = 0.55
PIXEL_NOISE_STD = 3.5


@dataclass
class SceneObject:
    """One drawn object: attributes, geometry and its visible mask."""

    shape: str
    colour: str
    size: str
    center: Tuple[float, float]  # (x, y) in pixels
    radius: float
    mask: np.ndarray  # bool (S, S): the pixels where the object is visible
    amodal_area: int  # pixels it would cover unoccluded

    @property
    def attributes(self) -> Dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size}

    @property
    def visible_fraction(self) -> float:
        return float(self.mask.sum()) / max(self.amodal_area, 1)


@dataclass
class Scene:
    image: np.ndarray  # uint8 (S, S, 3), RGB
    objects: List[SceneObject]  # in drawing order (later ones on top)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with size parameter r."""
    if shape == "square":
        h = 0.86 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, centroid at the centre
        big_r = 1.3 * r
        return [
            (cx + big_r * np.cos(a), cy + big_r * np.sin(a)) for a in np.deg2rad([-90, 30, 150])
        ]
    if shape == "star":  # five points, inner radius half the outer one
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.3 * r, 0.55 * r)
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]
    if shape == "cross":  # a plus sign
        a, b = 0.38 * r, 1.1 * r
        return [
            (cx - a, cy - b),
            (cx + a, cy - b),
            (cx + a, cy - a),
            (cx + b, cy - a),
            (cx + b, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + b),
            (cx - a, cy + b),
            (cx - a, cy + a),
            (cx - b, cy + a),
            (cx - b, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def rasterize_shape(
    shape: str, center: Tuple[float, float], radius: float, image_size: int
) -> np.ndarray:
    """``bool (S, S)`` mask of the whole (unoccluded) shape, drawn without anti-aliasing."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, radius), fill=1)
    return np.asarray(canvas, dtype=bool)


def sample_attributes(rng: np.random.Generator) -> List[Dict[str, str]]:
    """Attributes of 2-6 objects, all distinct as (shape, colour, size) triples."""
    num_objects = int(rng.integers(NUM_OBJECTS_RANGE[0], NUM_OBJECTS_RANGE[1] + 1))
    palette_sizes = rng.choice([2, 3, 4], size=2, p=PALETTE_SIZE_WEIGHTS)
    colours = list(rng.choice(list(COLOURS), size=int(palette_sizes[0]), replace=False))
    shapes = list(rng.choice(list(SHAPES), size=int(palette_sizes[1]), replace=False))
    chosen: List[Dict[str, str]] = []
    seen = set()
    while len(chosen) < num_objects:  # 2 x 2 x 2 >= 8 distinct triples > 6: always ends
        triple = (
            str(rng.choice(shapes)),
            str(rng.choice(colours)),
            "big" if rng.random() < BIG_PROBABILITY else "small",
        )
        if triple not in seen:
            seen.add(triple)
            chosen.append({"shape": triple[0], "colour": triple[1], "size": triple[2]})
    return chosen


def _visible_masks(amodal: List[np.ndarray]) -> List[np.ndarray]:
    """Visible part of each mask when drawn in order (later ones on top)."""
    label = np.full(amodal[0].shape, -1, dtype=np.int16)
    for i, mask in enumerate(amodal):
        label[mask] = i
    return [label == i for i in range(len(amodal))]


def place_objects(
    attributes: List[Dict[str, str]], image_size: int, rng: np.random.Generator
) -> List[SceneObject]:
    """Positions for the objects (big ones drawn first), each keeping enough of itself visible.

    An object that finds no place in ``PLACEMENT_TRIES`` tries is left out (at least two stay:
    the first two always fit on an empty canvas of this size).
    """
    order = sorted(
        range(len(attributes)), key=lambda i: (attributes[i]["size"] != "big", rng.random())
    )
    placed: List[Tuple[Dict[str, str], Tuple[float, float], float, np.ndarray]] = []
    for index in order:
        attrs = attributes[index]
        low, high = RADIUS_RANGE[attrs["size"]]
        radius = float(rng.uniform(low, high)) * image_size
        margin = EXTENT * radius + 1.0
        for _ in range(PLACEMENT_TRIES):
            if placed and rng.random() < NEAR_PLACEMENT_PROBABILITY:
                _, (ax, ay), anchor_radius, _ = placed[int(rng.integers(len(placed)))]
                distance = (radius + anchor_radius) * rng.uniform(0.85, 1.1)
                angle = rng.uniform(0, 2 * np.pi)
                center = (ax + distance * np.cos(angle), ay + distance * np.sin(angle))
                if not all(margin <= c <= image_size - margin for c in center):
                    continue
            else:
                center = tuple(float(c) for c in rng.uniform(margin, image_size - margin, size=2))
            mask = rasterize_shape(attrs["shape"], center, radius, image_size)
            amodal = [p[3] for p in placed] + [mask]
            visible = _visible_masks(amodal)
            if all(v.sum() >= MIN_VISIBLE_FRACTION * a.sum() for v, a in zip(visible, amodal)):
                placed.append((attrs, (float(center[0]), float(center[1])), radius, mask))
                break
    visible = _visible_masks([p[3] for p in placed])
    return [
        SceneObject(
            shape=a["shape"],
            colour=a["colour"],
            size=a["size"],
            center=c,
            radius=r,
            mask=v,
            amodal_area=int(m.sum()),
        )
        for (a, c, r, m), v in zip(placed, visible)
    ]


@lru_cache(maxsize=4)
def _pixel_grid(image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates of every pixel, float32 (cached: every image of a size shares them)."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    return yy, xx


@lru_cache(maxsize=4)
def _noise_tile(image_size: int) -> np.ndarray:
    """A fixed tile of Gaussian sensor noise, twice the image side; images take shifted crops.

    Drawing fresh noise for every pixel of every image costs more than the rest of the scene;
    a crop at a random offset is as good for this purpose and keeps the output a function of
    the parameters (the tile depends on the size only).
    """
    return np.random.default_rng(image_size).standard_normal(
        (2 * image_size, 2 * image_size, 3), dtype=np.float32
    )


def render_background(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """``float (S, S, 3)``: a greyish base with one or two soft luminance textures."""
    s = image_size
    yy, xx = _pixel_grid(s)
    base = rng.uniform(150, 205) + rng.normal(0, 4, size=3)
    texture = np.zeros((s, s), dtype=np.float32)
    for kind in rng.choice(
        ["blotches", "stripes", "checker", "gradient"], size=int(rng.integers(1, 3)), replace=False
    ):
        if kind == "blotches":
            coarse = Image.fromarray(rng.normal(0, 1, size=(5, 5)).astype(np.float32), mode="F")
            texture += 14 * np.asarray(coarse.resize((s, s), Image.BICUBIC))
        elif kind == "stripes":
            angle, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.15) * s
            texture += 8 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        elif kind == "checker":
            cell = max(2, int(rng.uniform(0.07, 0.15) * s))
            texture += 7 * (((xx // cell + yy // cell) % 2) * 2 - 1)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            texture += 20 * ((xx * np.cos(angle) + yy * np.sin(angle)) / s - 0.5)
    return base[None, None, :] + texture[:, :, None]


def paint_objects(
    canvas: np.ndarray, objects: List[SceneObject], rng: np.random.Generator
) -> np.ndarray:
    """Paint the objects' visible pixels: jittered colour, soft shading, darker outline."""
    for obj in objects:
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32) + rng.normal(0, 7, size=3)
        gx, gy = rng.normal(0, 1, size=2)
        body = obj.mask
        ys, xs = np.nonzero(body)
        # soft directional shading, +-8 % across the object
        shade = 1 + 0.08 * ((xs - obj.center[0]) * gx + (ys - obj.center[1]) * gy) / (
            obj.radius * np.hypot(gx, gy) + 1e-6
        )
        canvas[ys, xs] = colour[None, :] * shade[:, None]
        # outline: visible pixels with a 4-neighbour outside the object's visible mask
        padded = np.pad(body, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        canvas[body & ~interior] = colour * OUTLINE_DARKNESS
    return canvas


def generate_scene(image_size: int, rng: np.random.Generator) -> Scene:
    """A random scene: objects, their visible masks, and the rendered RGB image."""
    objects = place_objects(sample_attributes(rng), image_size, rng)
    canvas = paint_objects(render_background(image_size, rng), objects, rng)
    oy, ox = (int(v) for v in rng.integers(0, image_size, size=2))
    canvas += PIXEL_NOISE_STD * _noise_tile(image_size)[oy : oy + image_size, ox : ox + image_size]
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image=image, objects=objects)
