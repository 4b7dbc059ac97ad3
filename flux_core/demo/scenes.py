"""The demo model's world: one coloured shape at a named position on a plain background, its prompt, its picture,
and the measurement that says whether a generated picture shows what its prompt asked for.

    scene = Scene("circle", "red", "left", "blue")
    scene.prompt()                 # "a red circle on the left on a blue background"
    draw(scene, rng)               # a 128x128 PIL image (random size and jitter from rng)
    agrees(image, scene)           # the shape's colour fills its region, the background colour the rest

The training set covers every combination except `held_out_scenes()`, which the acceptance test prompts for
(tests/test_demo_quality.py); `draw(..., stripes=True)` is the demo LoRA's look (horizontal stripes in the shape).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128   # pixels per side: a 16x16 latent, 64 DiT image tokens
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (240, 215, 30),
           "white": (245, 245, 245), "black": (20, 20, 20)}
# Shape centres in a SIZE x SIZE picture. A prompt without a position means the centre.
POSITIONS = {"left": (34, 64), "right": (94, 64), "top": (64, 34), "bottom": (64, 94), "center": (64, 64)}
POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                  "center": "in the center"}
# The prompts' wording; {where} is one of POSITION_WORDS (or dropped for the centre). One wording: the demo's text
# encoders are random (frozen) and its DiT sees text tokens without positions, so which colour belongs to the
# shape and which to the background is read from the words around them; three wordings (the background first in
# one) left half the backgrounds wrong after 3000 training steps.
TEMPLATE = "a {colour} {shape} {where} on a {background} background"
RADIUS = (20, 27)          # the shape's outer radius in pixels (drawn uniformly)
JITTER = 4                 # pixels the centre moves around its position
STRIPE_PERIOD = 16         # pixels per stripe pair (the demo LoRA's look): 8-pixel stripes, one latent pixel each;
                           # 4-pixel ones were lost by the demo VAE (a latent pixel spans 8)
STRIPE_WINDOW = RADIUS[0] - JITTER - 2   # rows either side of a circle's position that stay inside it
# Measurement: the shape's region is a small disc around its position that every shape covers for the most part
# (a star's inner radius is 0.45 x its outer one, 9 pixels or more, minus up to 5.7 pixels of diagonal jitter:
# `agrees` asks for more than half of the disc); the background is everything farther than any shape reaches
# (27 + 4 pixels, with a margin).
SHAPE_REGION_RADIUS = 6
BACKGROUND_MIN_DISTANCE = 38


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    background: str

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.position, POSITIONS, "position"), (self.background, COLOURS, "background")):
            if value not in allowed:
                raise ValueError(f"Scene: {what} {value!r} is not one of {', '.join(allowed)}.")
        if self.colour == self.background:
            raise ValueError(f"Scene: the shape and the background are both {self.colour}.")

    def prompt(self, say_center: bool = True) -> str:
        where = POSITION_WORDS[self.position] if self.position != "center" or say_center else ""
        text = TEMPLATE.format(colour=self.colour, shape=self.shape, where=where,
                                          background=self.background)
        return " ".join(text.split())


def all_scenes() -> list[Scene]:
    return [Scene(s, c, p, b) for s in SHAPES for c in COLOURS for p in POSITIONS for b in COLOURS if b != c]


def held_out_scenes(count: int = 24, seed: int = 1234) -> list[Scene]:
    """Combinations of shape, colour, position and background the demo never saw in training (its test prompts)."""
    return sorted(random.Random(seed).sample(all_scenes(), count), key=lambda s: (s.shape, s.colour, s.position))


def training_scenes() -> list[Scene]:
    held = set(held_out_scenes())
    return [s for s in all_scenes() if s not in held]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> Image.Image:
    """A white-on-black "L" picture of the shape (outer radius r, centred at cx, cy)."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        h = r * 0.8   # a square of the circle's area, about
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        d.polygon([(cx + r * math.cos(a), cy + r * math.sin(a))
                   for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], fill=255)
    elif shape == "star":
        d.polygon(_star(cx, cy, r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    return mask


def stripe_shade(colour: str) -> tuple[int, ...]:
    """The second colour of a striped shape: a darker shade, or a lighter one for black (which has none darker)."""
    rgb = COLOURS[colour]
    if sum(rgb) / 3 < 80:
        return tuple(int(v + (255 - v) * 0.5) for v in rgb)
    return tuple(int(v * 0.35) for v in rgb)


def draw(scene: Scene, rng: random.Random, stripes: bool = False, size: int = SIZE) -> Image.Image:
    """The scene's picture; rng draws the radius and the jitter. stripes: the shape in horizontal stripes of its
    colour and `stripe_shade` of it (period STRIPE_PERIOD pixels)."""
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)
    r = rng.uniform(*RADIUS)
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    fill = Image.new("RGB", (size, size), COLOURS[scene.colour])
    if stripes:
        d = ImageDraw.Draw(fill)
        for y in range(0, size, STRIPE_PERIOD):
            d.rectangle((0, y + STRIPE_PERIOD // 2, size, y + STRIPE_PERIOD - 1), fill=stripe_shade(scene.colour))
    image.paste(fill, mask=shape_mask(scene.shape, cx, cy, r, size))
    return image


# ------------------------------------------------------------------------------------------- measurement

def nearest_colours(image: Image.Image) -> np.ndarray:
    """(H, W) index into COLOURS of each pixel's nearest palette colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    return ((pixels[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)


def _distance_map(position: str, size: int) -> np.ndarray:
    cx, cy = (v * size / SIZE for v in POSITIONS[position])
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return np.hypot(x - cx, y - cy)


def colour_shares(image: Image.Image, scene: Scene) -> tuple[float, float]:
    """(share of the shape's region in the shape's colour, share of the background region in the background
    colour), each region as defined above (scaled to the image's size)."""
    names = list(COLOURS)
    index = nearest_colours(image)
    distance = _distance_map(scene.position, image.width)
    scale = image.width / SIZE
    inside = index[distance <= SHAPE_REGION_RADIUS * scale]
    outside = index[distance >= BACKGROUND_MIN_DISTANCE * scale]
    return (float((inside == names.index(scene.colour)).mean()),
            float((outside == names.index(scene.background)).mean()))


def agrees(image: Image.Image, scene: Scene, share: float = 0.5) -> bool:
    """Whether the shape's colour holds more than `share` of its region and the background colour more than
    `share` of the rest: the picture shows the prompt's colours where the prompt put them."""
    shape_share, background_share = colour_shares(image, scene)
    return shape_share > share and background_share > share


def stripe_strength(image: Image.Image, scene: Scene) -> float:
    """How striped a circle is: the standard deviation, in grey levels, of the brightness down the circle's middle
    (STRIPE_WINDOW rows either side of its position, which the smallest circle covers whatever its jitter). A flat
    circle gives 0; a drawn striped one 24 to 60 (its colour against its stripe shade)."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    scale = image.width / SIZE
    cx, cy = (int(v * scale) for v in POSITIONS[scene.position])
    half = int(STRIPE_WINDOW * scale)
    return float(gray[cy - half:cy + half, cx - 2:cx + 3].mean(axis=1).std())
