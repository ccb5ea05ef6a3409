"""The offline demo set: synthetic images of coloured shapes with natural-language captions.

Each image shows 1..max_objects shapes of distinct kinds; the labels are the kinds. Colour,
size, position, rotation and background are nuisances: captions mention them, labels do not.
Everything follows from the seed: item i draws from `default_rng([seed, i])`, so the same
seed gives byte-identical files, and an item does not change when `n_items` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cmhash.config.choices.datasets import Demo
from cmhash.data.manifest import Collection, Item

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges at any image size
Point = tuple[float, float]
Drawer = Callable[[ImageDraw.ImageDraw, Point, float, float], None]  # (draw, centre, radius, angle)


def _regular(n: int, phase: float = 90.0, inner: float | None = None) -> list[Point]:
    """Unit-radius regular n-gon (or n-pointed star when `inner` is set), y pointing up."""
    step = 360.0 / n
    points = []
    for k in range(n):
        a = math.radians(phase + k * step)
        points.append((math.cos(a), math.sin(a)))
        if inner is not None:
            b = math.radians(phase + (k + 0.5) * step)
            points.append((inner * math.cos(b), inner * math.sin(b)))
    return points


def _heart() -> list[Point]:
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return list(zip(x / 17.0, (y + 2.5) / 17.0))


_ARM = 0.33
UNIT_POLYGONS: dict[str, list[Point]] = {
    "square": _regular(4, phase=45.0),
    "triangle": _regular(3),
    "diamond": [(0.0, 1.0), (0.6, 0.0), (0.0, -1.0), (-0.6, 0.0)],
    "hexagon": _regular(6, phase=0.0),
    "star": _regular(5, inner=0.42),
    "cross": [(-_ARM, 1), (_ARM, 1), (_ARM, _ARM), (1, _ARM), (1, -_ARM), (_ARM, -_ARM), (_ARM, -1),
              (-_ARM, -1), (-_ARM, -_ARM), (-1, -_ARM), (-1, _ARM), (-_ARM, _ARM)],
    "arrow": [(-1, 0.22), (0.15, 0.22), (0.15, 0.6), (1, 0), (0.15, -0.6), (0.15, -0.22), (-1, -0.22)],
    "heart": _heart(),
}  # fmt: skip


def _polygon(unit: list[Point]) -> Drawer:
    def draw(canvas: ImageDraw.ImageDraw, centre: Point, radius: float, angle: float) -> None:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        # Image y points down, so flip the unit shape's y while rotating.
        canvas.polygon([(centre[0] + radius * (x * c - y * s), centre[1] - radius * (x * s + y * c)) for x, y in unit], fill=255)

    return draw


def _disc(canvas: ImageDraw.ImageDraw, centre: Point, radius: float, angle: float) -> None:
    canvas.ellipse(_box(centre, radius), fill=255)


def _ring(canvas: ImageDraw.ImageDraw, centre: Point, radius: float, angle: float) -> None:
    canvas.ellipse(_box(centre, radius), fill=255)
    canvas.ellipse(_box(centre, 0.55 * radius), fill=0)


def _crescent(canvas: ImageDraw.ImageDraw, centre: Point, radius: float, angle: float) -> None:
    canvas.ellipse(_box(centre, radius), fill=255)
    a = math.radians(angle)
    bite = (centre[0] + 0.45 * radius * math.cos(a), centre[1] - 0.45 * radius * math.sin(a))
    canvas.ellipse(_box(bite, 0.85 * radius), fill=0)


def _half_disc(canvas: ImageDraw.ImageDraw, centre: Point, radius: float, angle: float) -> None:
    # The flat side sits a little below the centre, so the shape fills its box like the others.
    a = math.radians(angle)
    flat = (centre[0] + 0.3 * radius * math.sin(a), centre[1] + 0.3 * radius * math.cos(a))
    canvas.pieslice(_box(flat, radius), start=180 - angle, end=360 - angle, fill=255)


def _box(centre: Point, radius: float) -> tuple[float, float, float, float]:
    return (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)


# Label name -> (synonyms a caption may use instead, how to draw it). Label index = order here.
SHAPES: dict[str, tuple[tuple[str, ...], Drawer]] = {
    "circle": (("disc", "dot"), _disc),
    "square": (("box",), _polygon(UNIT_POLYGONS["square"])),
    "triangle": ((), _polygon(UNIT_POLYGONS["triangle"])),
    "star": ((), _polygon(UNIT_POLYGONS["star"])),
    "cross": (("plus sign",), _polygon(UNIT_POLYGONS["cross"])),
    "ring": (("donut", "hoop"), _ring),
    "diamond": (("rhombus",), _polygon(UNIT_POLYGONS["diamond"])),
    "hexagon": ((), _polygon(UNIT_POLYGONS["hexagon"])),
    "heart": ((), _polygon(UNIT_POLYGONS["heart"])),
    "arrow": ((), _polygon(UNIT_POLYGONS["arrow"])),
    "crescent": (("moon",), _crescent),
    "semicircle": (("half circle", "half disc"), _half_disc),
}
LABELS = list(SHAPES)

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 160, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 180), "pink": (245, 130, 190), "brown": (130, 80, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "cyan": (40, 200, 220), "grey": (128, 128, 128),
}  # fmt: skip
# Like real object classes, each shape kind has a colour it usually wears (hearts are mostly red);
# `usual_colour_rate` says how often. It is what lets random-init image features see the labels.
USUAL_COLOUR = {
    "circle": "orange", "square": "blue", "triangle": "green", "star": "yellow", "cross": "grey", "ring": "brown",
    "diamond": "cyan", "hexagon": "purple", "heart": "red", "arrow": "black", "crescent": "white", "semicircle": "pink",
}  # fmt: skip
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "white": (235, 235, 230), "black": (25, 25, 30), "beige": (225, 210, 170),
    "dark blue": (30, 40, 90), "light blue": (170, 200, 235), "dark green": (30, 70, 40), "light grey": (200, 200, 200),
}  # fmt: skip
MIN_CONTRAST = 100.0  # RGB distance an object colour keeps from the background, so every shape is visible
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SYNONYM_RATE = 0.25  # how often a caption names a shape by a synonym instead of its label name


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    centre: Point  # in units of the image side, 0..1
    radius: float  # in units of the image side
    angle: float  # degrees
    size: str | None  # "small", "large", or None (medium; captions leave it out)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in reading order: left to right, or top to bottom
    vertical: bool  # shapes stacked top to bottom rather than side by side
    background: str


def sample_scene(rng: np.random.Generator, max_objects: int, usual_colour_rate: float) -> Scene:
    n = int(rng.integers(1, max_objects + 1))
    kinds = [LABELS[k] for k in rng.choice(len(LABELS), size=n, replace=False)]
    colours = [_colour(kind, rng, usual_colour_rate) for kind in kinds]
    background = _background(colours, rng)
    vertical = bool(rng.random() < 0.5)
    slot = 1.0 / n  # the image is cut into n equal slots along the layout axis, one shape per slot
    shapes = []
    for k, (kind, colour) in enumerate(zip(kinds, colours)):
        scale = float(rng.uniform(0.65, 1.0))  # share of the largest radius that fits the slot
        radius = 0.48 * scale * slot
        free = 0.5 * slot - radius  # the shape moves freely while staying inside its slot
        along = (k + 0.5) * slot + float(rng.uniform(-free, free))
        across = 0.5 + 0.8 * float(rng.uniform(-(0.5 - radius), 0.5 - radius))
        centre = (across, along) if vertical else (along, across)
        size = "small" if scale < 0.75 else "large" if scale > 0.9 else None
        shapes.append(Shape(kind, colour, centre, radius, float(rng.uniform(-20, 20)), size))
    return Scene(tuple(shapes), vertical, background)


def _colour(kind: str, rng: np.random.Generator, usual_colour_rate: float) -> str:
    usual = USUAL_COLOUR[kind]
    if rng.random() < usual_colour_rate:
        return usual
    return _pick(rng, [c for c in OBJECT_COLOURS if c != usual])


def _background(colours: list[str], rng: np.random.Generator) -> str:
    """A background every shape stands out from (the most contrasting one if none does)."""
    contrast = {b: min(_distance(OBJECT_COLOURS[c], rgb) for c in colours) for b, rgb in BACKGROUNDS.items()}
    fitting = [b for b, d in contrast.items() if d >= MIN_CONTRAST]
    return _pick(rng, fitting) if fitting else max(contrast, key=contrast.get)


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image: a jittered, gently shaded background, then each shape blended in
    through an anti-aliased mask."""
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32) + rng.uniform(-12, 12, size=3)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    tilt = rng.uniform(-18, 18, size=2).astype(np.float32)  # a faint linear shading in a random direction
    shade = tilt[0] * ramp[None, :] + tilt[1] * ramp[:, None]
    pixels = base[None, None, :] + shade[:, :, None]
    big = size * SUPERSAMPLE
    for shape in scene.shapes:
        mask = Image.new("L", (big, big), 0)
        centre = (shape.centre[0] * big, shape.centre[1] * big)
        SHAPES[shape.kind][1](ImageDraw.Draw(mask), centre, shape.radius * big, shape.angle)
        alpha = np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32)[:, :, None] / 255.0
        colour = np.array(OBJECT_COLOURS[shape.colour], dtype=np.float32) + rng.uniform(-15, 15, size=3)
        pixels = pixels * (1.0 - alpha) + colour * alpha
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(shape: Shape, rng: np.random.Generator) -> str:
    synonyms = SHAPES[shape.kind][0]
    noun = _pick(rng, synonyms) if synonyms and rng.random() < SYNONYM_RATE else shape.kind
    words = [noun]
    if rng.random() < 0.85:
        words.insert(0, shape.colour)
    if shape.size and rng.random() < 0.6:
        words.insert(0, _pick(rng, SIZE_WORDS[shape.size]))
    return _article(" ".join(words))


def _arrangement(phrases: list[str], vertical: bool, rng: np.random.Generator) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) > 2:
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]
    first, second = phrases
    relations = (
        ["{a} above {b}", "{b} below {a}", "{b} under {a}"] if vertical else ["{a} to the left of {b}", "{b} to the right of {a}"]
    ) + ["{a} next to {b}", "{a} beside {b}", "{a} and {b}", "{b} and {a}"]
    return _pick(rng, relations).format(a=first, b=second)


SENTENCES = ("{s}", "{s} {bg}", "a picture of {s}", "a drawing of {s} {bg}", "an image showing {s}",
             "there is {s} {bg}", "{s}, {bg}", "a simple illustration of {s}")  # fmt: skip
BACKGROUND_PHRASES = ("on a {b} background", "against a {b} backdrop", "on {b}", "over a plain {b} background")


def describe(scene: Scene, rng: np.random.Generator) -> str:
    phrases = [_noun_phrase(shape, rng) for shape in scene.shapes]
    arrangement = _arrangement(phrases, scene.vertical, rng)
    background = _pick(rng, BACKGROUND_PHRASES).format(b=scene.background)
    return _pick(rng, SENTENCES).format(s=arrangement, bg=background)


def build_demo(root: Path, opts: Demo, out_dir: Path, seed: int) -> Collection:
    """Render `n_items` scenes into out_dir/images/<id>.png with captions and shape labels; `root`
    is unused."""
    n_items, size, max_objects, usual_colour_rate = opts.n_items, opts.image_size, opts.max_objects, opts.usual_colour_rate
    image_dir = Path(out_dir) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(n_items):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng, max_objects, usual_colour_rate)
        path = image_dir / f"{index:06d}.png"
        render(scene, size, rng).save(path)
        caption = describe(scene, rng)
        labels = tuple(sorted(LABELS.index(shape.kind) for shape in scene.shapes))
        items.append(Item(path.stem, str(path), caption, labels))
    return Collection("demo", items, LABELS)
