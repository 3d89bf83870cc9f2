"""``synthetic-har``: an offline, procedurally drawn stand-in for the Human Action Recognition set.

Each image is a stick figure (sometimes two) whose pose and props stand for one of the 15 HAR
actions: a phone at the ear for *calling*, wheels under the rider for *cycling*, a bed and "Z"s
for *sleeping*, and so on. Position, scale, rotation, limb angles, line width, colours, background
and pixel noise all vary per image, and colours are drawn independently of the class, so a model
has to learn shapes rather than a palette. The set needs no download, which lets demos, tests and
CI run the whole fine-tuning pipeline without network access.

Everything random comes from one ``np.random.default_rng(seed)`` (never the global state),
gradients and noise use plain float32 arithmetic, and shapes are drawn at integer pixel
coordinates, so the same arguments give bit-identical arrays from run to run and machine to
machine. Other NumPy or Pillow releases may change them: neither promises a fixed random stream
or rasteriser across versions.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

HAR_CLASSES: tuple[str, ...] = (
    "calling", "clapping", "cycling", "dancing", "drinking", "eating", "fighting", "hugging",
    "laughing", "listening_to_music", "running", "sitting", "sleeping", "texting", "using_laptop",
)

Point = tuple[float, float]
Color = tuple[int, int, int]
Scene = Callable[["_Pen", np.random.Generator], None]

# Drawing at 2x and box-filtering down anti-aliases the lines without making them blurry.
_SUPERSAMPLE = 2

# Body proportions in scene units; a standing person is about one unit tall.
_TORSO, _NECK, _HEAD_R = 0.36, 0.03, 0.085
_UPPER_ARM, _FOREARM = 0.17, 0.16
_THIGH, _SHIN = 0.22, 0.22


@dataclass(frozen=True)
class _Variation:
    """How much the nuisance factors vary: together they set how hard the set is.

    Tuned so that a tiny ViT trained from scratch for ten epochs on 2,000 images learns the
    task only partly; each factor below made that markedly harder when raised.
    """

    scale: tuple[float, float] = (0.6, 1.0)  # scene size as a fraction of the image side
    rotation_sd: float = 4.0  # degrees
    line_width: tuple[float, float] = (0.045, 0.065)  # relative to the scene size
    gradient_p: float = 0.5  # chance of a gradient rather than a solid backdrop
    # Chance that the backdrop is a pale tint, which makes the figures on it come out darker.
    # Random light-on-dark vs dark-on-light was the single hardest factor for a small ViT.
    pale_p: float = 1.0
    clutter_p: float = 0.15  # chance of random shapes behind the scene
    clutter_count: tuple[int, int] = (2, 6)
    noise_sd: tuple[float, float] = (2.0, 6.0)  # additive Gaussian noise, in 0-255 units
    # Minimum luminance gaps to the backdrop, so figures and props stay visible on any of them.
    figure_contrast: float = 80.0
    prop_contrast: float = 55.0


_VARIATION = _Variation()


def make_synthetic_har(num_images: int, image_size: int = 96,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_images`` labelled action images.

    Returns ``(images, labels)``: uint8 RGB images of shape ``(num_images, image_size, image_size,
    3)`` and int64 indices into `HAR_CLASSES` of shape ``(num_images,)``. Class counts differ by at
    most one and their order is shuffled by ``seed``; the same arguments always give bit-identical
    arrays.
    """
    num_images = _checked_int("num_images", num_images, minimum=1)
    image_size = _checked_int("image_size", image_size, minimum=16)
    seed = _checked_int("seed", seed, minimum=0)

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images, dtype=np.int64) % len(HAR_CLASSES))
    canvas = _CanvasGrid(image_size * _SUPERSAMPLE)
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = _render(_SCENES[HAR_CLASSES[label]], canvas, rng, _VARIATION)
    return images, labels


def _checked_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int, or an error that names the argument."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Rendering: background, placement, scene, downsampling, noise.
# --------------------------------------------------------------------------------------------

class _CanvasGrid:
    """Pixel-coordinate ramps of the supersampled canvas, built once per call for gradients."""

    def __init__(self, side: int):
        self.side = side
        ramp = np.linspace(-0.5, 0.5, side, dtype=np.float32)
        self.x = ramp[None, :]
        self.y = ramp[:, None]


@dataclass
class _Style:
    """Colours and head style of one image, drawn independently of its class."""

    figure: Color
    other_figure: Color  # the second person in two-person scenes
    prop: Color
    accent: Color
    background: Color  # representative colour, for things that must contrast with it
    hollow_heads: bool


def _render(scene: Scene, canvas: _CanvasGrid, rng: np.random.Generator,
            var: _Variation) -> np.ndarray:
    """One image: a random backdrop, the scene at a random pose, then downsampling and noise."""
    side = canvas.side
    image, bg_color = _background(canvas, rng, var.gradient_p, var.pale_p)
    draw = ImageDraw.Draw(image)
    if rng.random() < var.clutter_p:
        _clutter(draw, side, rng, var.clutter_count)

    style = _Style(
        figure=_contrasting_color(rng, bg_color, var.figure_contrast),
        other_figure=_contrasting_color(rng, bg_color, var.figure_contrast),
        prop=_contrasting_color(rng, bg_color, var.prop_contrast),
        accent=_contrasting_color(rng, bg_color, var.prop_contrast),
        background=bg_color,
        hollow_heads=bool(rng.random() < 0.35),
    )
    # The scene spans about one unit; keep it mostly inside the image wherever it lands.
    scale = side * rng.uniform(*var.scale)
    slack = max(side - scale, 0.0) / 2 + 0.04 * side
    pen = _Pen(
        draw, style,
        cx=side / 2 + rng.uniform(-slack, slack),
        cy=side / 2 + rng.uniform(-slack, slack),
        scale=scale,
        angle_deg=rng.normal(0.0, var.rotation_sd),
        mirror=bool(rng.random() < 0.5),
        width=scale * rng.uniform(*var.line_width),
    )
    scene(pen, rng)

    pixels = np.asarray(image.reduce(_SUPERSAMPLE), dtype=np.float32)
    sigma = np.float32(rng.uniform(*var.noise_sd))
    pixels += sigma * rng.standard_normal(pixels.shape, dtype=np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _background(canvas: _CanvasGrid, rng: np.random.Generator, gradient_p: float,
                pale_p: float) -> tuple[Image.Image, Color]:
    """A solid or linear-gradient backdrop, and the colour that best represents it."""
    c0 = rng.integers(0, 256, 3)
    if rng.random() < pale_p:
        c0 = 255 - (255 - c0) // 3
    if rng.random() >= gradient_p:
        return Image.new("RGB", (canvas.side, canvas.side), _rgb(c0)), _rgb(c0)
    # Keep gradients gentle enough that one figure colour contrasts with both ends.
    c1 = np.clip(c0 + rng.integers(-90, 91, 3), 0, 255)
    angle = rng.uniform(0.0, 2 * math.pi)
    t = np.float32(math.cos(angle)) * canvas.x + np.float32(math.sin(angle)) * canvas.y + 0.5
    t = np.clip(t, 0.0, 1.0)[..., None]
    c0f, c1f = c0.astype(np.float32), c1.astype(np.float32)
    pixels = np.rint(c0f + t * (c1f - c0f)).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), _rgb((c0 + c1) // 2)


def _clutter(draw: ImageDraw.ImageDraw, side: int, rng: np.random.Generator,
             count: tuple[int, int]) -> None:
    """A few random rectangles, ellipses and strokes, so the backdrop is not always plain."""
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        x, y = rng.uniform(0, side, 2)
        w, h = rng.uniform(0.05, 0.3, 2) * side
        box = [round(x), round(y), round(x + w), round(y + h)]
        color = _rgb(rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle(box, fill=color)
        elif kind == 1:
            draw.ellipse(box, fill=color)
        else:
            draw.line(box, fill=color, width=max(1, round(side * rng.uniform(0.01, 0.03))))


def _contrasting_color(rng: np.random.Generator, against: Color, gap: float) -> Color:
    """A random colour whose luminance differs from ``against`` by at least ``gap``."""
    target = _luminance(against)
    for _ in range(12):
        color = _rgb(rng.integers(0, 256, 3))
        if abs(_luminance(color) - target) >= gap:
            return color
    return (0, 0, 0) if target > 127 else (255, 255, 255)


def _luminance(color: Color) -> float:
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


def _rgb(values: Sequence[int] | np.ndarray) -> Color:
    return (int(values[0]), int(values[1]), int(values[2]))


# --------------------------------------------------------------------------------------------
# Drawing primitives in scene units.
# --------------------------------------------------------------------------------------------

def _dir(deg: float) -> Point:
    """Unit vector at ``deg`` degrees; y points down, so positive angles turn clockwise."""
    rad = math.radians(deg)
    return (math.cos(rad), math.sin(rad))


def _add(p: Point, q: Point, k: float = 1.0) -> Point:
    return (p[0] + k * q[0], p[1] + k * q[1])


class _Pen:
    """Draws in scene units (roughly [-0.5, 0.5] squared, y down) onto the supersampled canvas.

    The scene-to-pixel map holds the image's random mirror, rotation, scale and offset, so the
    scene functions describe poses only. Widths are multiples of the image's base line width.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, style: _Style, *, cx: float, cy: float,
                 scale: float, angle_deg: float, mirror: bool, width: float):
        self.draw, self.style = draw, style
        self.cx, self.cy, self.scale, self.width = cx, cy, scale, width
        self.sign = -1.0 if mirror else 1.0
        self.cos, self.sin = _dir(angle_deg)

    def px(self, p: Point) -> tuple[int, int]:
        # Integer pixels: Pillow's handling of fractional coordinates is not part of its contract.
        x, y = self.sign * p[0], p[1]
        return (round(self.cx + self.scale * (self.cos * x - self.sin * y)),
                round(self.cy + self.scale * (self.sin * x + self.cos * y)))

    def _w(self, width: float) -> int:
        return max(1, round(self.width * width))

    def line(self, points: Sequence[Point], color: Color, width: float = 1.0) -> None:
        self.draw.line([self.px(p) for p in points], fill=color, width=self._w(width),
                       joint="curve")

    def polygon(self, points: Sequence[Point], color: Color) -> None:
        self.draw.polygon([self.px(p) for p in points], fill=color)

    def disc(self, center: Point, r: float, color: Color) -> None:
        x, y = self.px(center)
        rr = max(1, round(r * self.scale))
        self.draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=color)

    def ring(self, center: Point, r: float, color: Color, width: float = 1.0) -> None:
        x, y = self.px(center)
        rr = max(1, round(r * self.scale))
        self.draw.ellipse([x - rr, y - rr, x + rr, y + rr], outline=color,
                          width=min(self._w(width), rr))

    def ellipse(self, center: Point, rx: float, ry: float, color: Color,
                angle: float = 0.0) -> None:
        """Filled ellipse with its x radius along ``angle``; a polygon so rotation is exact."""
        u, v = _dir(angle), _dir(angle + 90)
        self.polygon([_add(_add(center, u, rx * c), v, ry * s) for c, s in _UNIT_CIRCLE], color)

    def rect(self, center: Point, w: float, h: float, color: Color, angle: float = 0.0) -> None:
        """Filled rectangle of width ``w`` along ``angle`` and height ``h`` across it."""
        u, v = _dir(angle), _dir(angle + 90)
        self.polygon([_add(_add(center, u, w / 2 * a), v, h / 2 * b)
                      for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))], color)

    def arc(self, center: Point, r: float, start: float, end: float, color: Color,
            width: float = 1.0, steps: int = 10) -> None:
        """Arc from ``start`` to ``end`` degrees, as a polyline so it follows the image's mirror."""
        self.line([_add(center, _dir(start + (end - start) * i / steps), r)
                   for i in range(steps + 1)], color, width)


_UNIT_CIRCLE = tuple(_dir(360.0 * i / 20) for i in range(20))


# --------------------------------------------------------------------------------------------
# People.
# --------------------------------------------------------------------------------------------

def _reach(root: Point, target: Point, l1: float, l2: float, bend: float) -> tuple[Point, Point]:
    """(middle joint, end) of a two-segment limb from ``root`` reaching for ``target``.

    ``bend`` (+1 or -1) picks which side the elbow/knee goes; out-of-reach targets are clamped
    onto the reachable ring so a jittered target never tears a limb apart.
    """
    dx, dy = target[0] - root[0], target[1] - root[1]
    dist = min(max(math.hypot(dx, dy), abs(l1 - l2) + 1e-3), l1 + l2 - 1e-3)
    heading = math.degrees(math.atan2(dy, dx))
    cos_a = (l1 * l1 + dist * dist - l2 * l2) / (2 * l1 * dist)
    opening = math.degrees(math.acos(min(1.0, max(-1.0, cos_a))))
    middle = _add(root, _dir(heading + bend * opening), l1)
    return middle, _add(root, _dir(heading), dist)


@dataclass
class _Body:
    """Where a drawn person's parts ended up, in scene units, for placing props."""

    hip: Point
    head: Point
    head_r: float
    up: float  # scene angle from neck to head centre
    hands: tuple[Point, Point]
    facing: float

    def forward(self, deg: float) -> float:
        """Scene angle of ``deg`` given in the person's own frame (0 = the way they face)."""
        return deg if self.facing > 0 else 180.0 - deg


def _person(pen: _Pen, rng: np.random.Generator, color: Color, *, hip: Point,
            hands: tuple[Point, Point], feet: tuple[Point, Point], size: float = 1.0,
            facing: float = 1.0, torso: float = -90.0, tilt: float = 0.0,
            elbows: tuple[float, float] = (1.0, -1.0), knees: tuple[float, float] = (-1.0, 1.0),
            jitter: float = 0.022) -> _Body:
    """Draw a stick person and return its key points.

    The pose is given in the person's own frame, facing +x: ``torso`` is the hip-to-neck angle,
    ``tilt`` turns the head forward (+) or back (-), hand targets are relative to the neck and
    foot targets to the hip, in units of a one-unit-tall person. ``size`` and ``facing`` (+1/-1)
    then scale and mirror it into the scene at ``hip``.
    """
    torso += rng.normal(0.0, 4.0)
    tilt += rng.normal(0.0, 5.0)
    neck = _add((0.0, 0.0), _dir(torso), _TORSO)
    head = _add(neck, _dir(torso + tilt), _NECK + _HEAD_R)

    def nudge(p: Point) -> Point:
        return (p[0] + rng.normal(0.0, jitter), p[1] + rng.normal(0.0, jitter))

    arms = [_reach(neck, nudge(_add(neck, t)), _UPPER_ARM, _FOREARM, b)
            for t, b in zip(hands, elbows)]
    legs = [_reach((0.0, 0.0), nudge(t), _THIGH, _SHIN, b) for t, b in zip(feet, knees)]

    def scene(p: Point) -> Point:
        return (hip[0] + size * facing * p[0], hip[1] + size * p[1])

    w = size
    for knee, foot in legs:
        pen.line([hip, scene(knee), scene(foot)], color, w)
    pen.line([hip, scene(neck)], color, w)
    for elbow, hand in arms:
        pen.line([scene(neck), scene(elbow), scene(hand)], color, w)
    head_s, head_r = scene(head), _HEAD_R * size
    if pen.style.hollow_heads:
        pen.disc(head_s, head_r, pen.style.background)
        pen.ring(head_s, head_r, color, 0.8 * w)
    else:
        pen.disc(head_s, head_r, color)

    neck_s = scene(neck)
    up = math.degrees(math.atan2(head_s[1] - neck_s[1], head_s[0] - neck_s[0]))
    return _Body(hip=hip, head=head_s, head_r=head_r, up=up,
                 hands=(scene(arms[0][1]), scene(arms[1][1])), facing=facing)


_STAND = ((-0.06, 0.43), (0.06, 0.43))  # feet of a standing person
_ARMS_DOWN = ((-0.07, 0.31), (0.07, 0.31))


def _hip(rng: np.random.Generator, x: float, y: float, spread: float = 0.03) -> Point:
    """A hip position near (x, y), so figures do not sit at the same spot in every scene."""
    return (x + rng.uniform(-spread, spread), y + rng.uniform(-spread, spread))


def _grip(hip: Point, torso: float, point: Point, size: float = 1.0) -> Point:
    """The hand target, relative to the neck, that puts a hand on scene ``point``.

    For people facing +x whose props are placed in scene units (handlebars, a keyboard).
    """
    neck = _add(hip, _dir(torso), _TORSO * size)
    return ((point[0] - neck[0]) / size, (point[1] - neck[1]) / size)


# --------------------------------------------------------------------------------------------
# Props.
# --------------------------------------------------------------------------------------------

def _chair(pen: _Pen, seat: Point, color: Color) -> None:
    """A side-view chair whose seat centre is ``seat``, its back behind a sitter facing +x."""
    back_x, front_x, floor = seat[0] - 0.12, seat[0] + 0.1, seat[1] + 0.24
    pen.line([(back_x, seat[1] - 0.3), (back_x, floor)], color, 0.8)
    pen.line([(back_x, seat[1]), (front_x, seat[1]), (front_x, floor)], color, 0.8)


def _table(pen: _Pen, left: float, right: float, top: float, floor: float,
           color: Color) -> None:
    """A side-view table: a thick top from ``left`` to ``right`` and two legs to the floor."""
    pen.rect(((left + right) / 2, top), right - left, 0.035, color)
    inset = 0.03
    pen.line([(left + inset, top), (left + inset, floor)], color, 0.7)
    pen.line([(right - inset, top), (right - inset, floor)], color, 0.7)


def _phone(pen: _Pen, at: Point, angle: float, color: Color, size: float = 1.0) -> None:
    """A phone whose long side runs along ``angle``."""
    pen.rect(at, 0.1 * size, 0.05 * size, color, angle)


def _burst(pen: _Pen, at: Point, heading: float, color: Color, spread: float = 40.0) -> None:
    """Short rays fanning out from ``at``: the comic-strip sign for a sound or an impact."""
    for da in (-spread, 0.0, spread):
        d = _dir(heading + da)
        pen.line([_add(at, d, 0.07), _add(at, d, 0.15)], color, 0.7)


def _ha(pen: _Pen, at: Point, height: float, away: float, color: Color) -> None:
    """The letters "HA" in strokes, from ``at`` outwards along scene x direction ``away``."""
    w = 0.6 * height
    # H and A are mirror-symmetric, so only their order needs fixing to read left to right
    # after the image's random mirror.
    letters = "HA" if away * pen.sign > 0 else "AH"
    for k, letter in enumerate(letters):
        x = at[0] + away * 1.5 * w * k - (w if away < 0 else 0.0)
        y = at[1]
        if letter == "H":
            pen.line([(x, y), (x, y + height)], color, 0.5)
            pen.line([(x + w, y), (x + w, y + height)], color, 0.5)
            pen.line([(x, y + height / 2), (x + w, y + height / 2)], color, 0.5)
        else:
            pen.line([(x, y + height), (x + w / 2, y), (x + w, y + height)], color, 0.5)
            pen.line([(x + w / 4, y + 0.6 * height), (x + 3 * w / 4, y + 0.6 * height)], color,
                     0.5)


def _music_note(pen: _Pen, at: Point, color: Color) -> None:
    """An eighth note whose head is at ``at``."""
    pen.ellipse(at, 0.03, 0.022, color, -20.0)
    stem_top = (at[0] + 0.025, at[1] - 0.11)
    pen.line([(at[0] + 0.025, at[1]), stem_top], color, 0.5)
    pen.line([stem_top, (stem_top[0] + 0.04, stem_top[1] + 0.04)], color, 0.5)


# --------------------------------------------------------------------------------------------
# One scene per class. Each draws into roughly [-0.5, 0.5] squared, facing +x before mirroring.
# --------------------------------------------------------------------------------------------

def _calling(pen: _Pen, rng: np.random.Generator) -> None:
    """Phone held against the side of the head, elbow raised out to the side."""
    st = pen.style
    other = _ARMS_DOWN[0] if rng.random() < 0.6 else (-0.1, 0.2)  # hanging, or hand on hip
    body = _person(pen, rng, st.figure, hip=_hip(rng, 0.0, 0.06),
                   hands=(other, (0.1, -0.08)), feet=_STAND, elbows=(-1.0, 1.0))
    ear = _add(body.head, _dir(body.up + 90.0 * body.facing), body.head_r + 0.015)
    _phone(pen, ear, body.up + rng.normal(0.0, 8.0), st.prop, 1.5)


def _clapping(pen: _Pen, rng: np.random.Generator) -> None:
    """Side view, both hands together in front of the chest, with impact rays."""
    st = pen.style
    hands = (0.17, rng.uniform(-0.02, 0.06))
    body = _person(pen, rng, st.figure, hip=_hip(rng, -0.08, 0.06),
                   hands=(hands, (hands[0], hands[1] - 0.02)), feet=_STAND,
                   elbows=(1.0, 1.0), jitter=0.01)
    meet = ((body.hands[0][0] + body.hands[1][0]) / 2, (body.hands[0][1] + body.hands[1][1]) / 2)
    _burst(pen, meet, body.forward(-10.0), st.accent, spread=45.0)


def _cycling(pen: _Pen, rng: np.random.Generator) -> None:
    """Rider leaning forward over a two-wheeled frame, hands on the bars, feet on the pedals."""
    st = pen.style
    r = 0.17
    rear, front = (-0.26, 0.3), (0.26, 0.3)
    crank, seat, bar = (0.0, 0.31), (-0.09, 0.02), (0.2, -0.04)
    for wheel in (rear, front):
        pen.ring(wheel, r, st.prop, 0.8)
    pen.line([rear, seat, crank, rear], st.prop, 0.8)
    pen.line([seat, bar, crank], st.prop, 0.8)
    pen.line([bar, front], st.prop, 0.8)
    pen.line([(seat[0] - 0.05, seat[1] - 0.01), (seat[0] + 0.04, seat[1] - 0.01)], st.accent, 1.0)
    pen.line([(bar[0] - 0.05, bar[1] - 0.03), bar], st.accent, 1.0)

    phase = rng.uniform(0.0, 360.0)  # the crank turns, so the legs differ image to image
    pedals = [_add(crank, _dir(phase + k * 180.0), 0.07) for k in (0, 1)]
    size, torso = 0.85, -55.0
    hip = (seat[0], seat[1] - 0.04)
    hand = _grip(hip, torso, bar, size)
    feet = tuple(((p[0] - hip[0]) / size, (p[1] - hip[1]) / size) for p in pedals)
    _person(pen, rng, st.figure, hip=hip, size=size, torso=torso, tilt=-10.0,
            hands=(hand, hand), feet=feet, knees=(-1.0, -1.0), jitter=0.01)


def _dancing(pen: _Pen, rng: np.random.Generator) -> None:
    """Both arms thrown up, one leg kicked out to the side."""
    st = pen.style
    kick = (0.3, rng.uniform(0.12, 0.28))
    _person(pen, rng, st.figure, hip=_hip(rng, -0.05, 0.08), torso=rng.uniform(-100.0, -85.0),
            hands=((-0.16, rng.uniform(-0.3, -0.18)), (0.16, rng.uniform(-0.3, -0.18))),
            feet=((-0.08, 0.43), kick), elbows=(1.0, -1.0), knees=(-1.0, -1.0))


def _drinking(pen: _Pen, rng: np.random.Generator) -> None:
    """Side view, head tipped back, a cup raised to the mouth."""
    st = pen.style
    body = _person(pen, rng, st.figure, hip=_hip(rng, -0.05, 0.08), tilt=-35.0,
                   hands=(_ARMS_DOWN[1], (0.11, -0.09)), feet=_STAND, elbows=(-1.0, 1.0),
                   jitter=0.012)
    axis = body.forward(-60.0)  # the cup's bottom-to-rim axis, tipped towards the face
    cup = _add(body.hands[1], _dir(axis), 0.02)
    pen.rect(cup, 0.13, 0.09, st.prop, axis)
    if rng.random() < 0.5:
        pen.arc(_add(cup, _dir(axis + 90.0 * body.facing), 0.055), 0.035, 0.0, 360.0,
                st.prop, 0.5)


def _eating(pen: _Pen, rng: np.random.Generator) -> None:
    """Front view behind a table with a bowl on it, spoon raised to the mouth."""
    st = pen.style
    top = 0.14
    body = _person(pen, rng, st.figure, hip=_hip(rng, 0.0, 0.1, 0.02),
                   hands=((-0.12, 0.2), (0.05, -0.1)), feet=_STAND, elbows=(-1.0, 1.0))
    _table(pen, -0.42, 0.42, top, 0.5, st.accent)
    bowl = (rng.uniform(-0.12, 0.12), top - 0.02)
    pen.polygon([_add(bowl, _dir(a), 0.11) for a in range(0, 181, 15)], st.prop)
    pen.line([(bowl[0] - 0.14, bowl[1]), (bowl[0] + 0.14, bowl[1])], st.prop, 0.8)
    hand = body.hands[1]
    pen.line([(hand[0] - 0.02, hand[1] + 0.06), (hand[0] + 0.01, hand[1] - 0.04)], st.prop, 0.6)


def _fighting(pen: _Pen, rng: np.random.Generator) -> None:
    """Two people facing off, punching arms extended towards each other."""
    st = pen.style
    size = 0.78
    for facing, x, color in ((1.0, -0.25, st.figure), (-1.0, 0.25, st.other_figure)):
        punch = (0.32, rng.uniform(-0.1, 0.0))
        guard = (0.1, rng.uniform(-0.12, -0.04))
        _person(pen, rng, color, hip=_hip(rng, x, 0.12, 0.02), size=size, facing=facing,
                torso=-80.0, hands=(guard, punch), elbows=(1.0, 1.0),
                feet=((-0.18, 0.38), (0.18, 0.38)), knees=(1.0, 1.0))


def _hugging(pen: _Pen, rng: np.random.Generator) -> None:
    """Two people pressed together, each with arms wrapped round the other's back."""
    st = pen.style
    size = 0.85
    gap = rng.uniform(0.1, 0.13)
    for facing, color in ((1.0, st.figure), (-1.0, st.other_figure)):
        # Hands reach just past the partner's torso: round the back, not through the body.
        around = 2 * gap / size + 0.03
        _person(pen, rng, color, hip=(-facing * gap, 0.1), size=size, facing=facing,
                torso=-82.0, tilt=12.0, hands=((around, 0.03), (around, 0.11)),
                feet=((-0.08, 0.43), (0.05, 0.43)), elbows=(-1.0, 1.0), jitter=0.012)


def _laughing(pen: _Pen, rng: np.random.Generator) -> None:
    """Leaning back, head thrown back with a wide open mouth, "HA" floating beside it."""
    st = pen.style
    body = _person(pen, rng, st.figure, hip=_hip(rng, -0.04, 0.08), torso=-100.0, tilt=-20.0,
                   hands=((-0.03, 0.25), (0.05, 0.25)), feet=_STAND, elbows=(1.0, -1.0))
    mouth_color = st.figure if st.hollow_heads else st.background
    face = body.up + 90.0 * body.facing  # the side of the head the person faces
    mouth = _add(body.head, _dir(face), 0.4 * body.head_r)
    pen.ellipse(mouth, 0.4 * body.head_r, 0.6 * body.head_r, mouth_color, body.up)
    at = _add(body.head, (0.13 * body.facing, rng.uniform(-0.08, 0.04)))
    _ha(pen, at, rng.uniform(0.09, 0.12), body.facing, st.accent)


def _listening(pen: _Pen, rng: np.random.Generator) -> None:
    """Headphones over the head: a band arcing over it and a cup on each ear."""
    st = pen.style
    touch = rng.random() < 0.5
    hand = (0.1, -0.1) if touch else _ARMS_DOWN[1]
    body = _person(pen, rng, st.figure, hip=_hip(rng, 0.0, 0.08),
                   hands=(_ARMS_DOWN[0], hand), feet=_STAND, elbows=(-1.0, 1.0))
    r = body.head_r
    pen.arc(body.head, 1.35 * r, body.up - 80.0, body.up + 80.0, st.prop, 1.0)
    for side in (-1.0, 1.0):
        pen.ellipse(_add(body.head, _dir(body.up + side * 90.0), 1.2 * r),
                    0.55 * r, 0.85 * r, st.prop, body.up)
    if rng.random() < 0.6:
        _music_note(pen, _add(body.head, (0.2 if rng.random() < 0.5 else -0.2, -0.02)),
                    st.accent)


def _running(pen: _Pen, rng: np.random.Generator) -> None:
    """Leaning forward mid-stride: legs far apart, arms swinging bent at the elbow."""
    st = pen.style
    body = _person(pen, rng, st.figure, hip=_hip(rng, 0.0, 0.04), torso=-70.0, tilt=5.0,
                   hands=((-0.14, 0.12), (0.17, -0.06)), elbows=(-1.0, 1.0),
                   feet=((0.3, 0.3), (-0.32, 0.24)), knees=(-1.0, 1.0))
    if rng.random() < 0.5:
        for dy in (-0.15, 0.0, 0.15):
            start = _add(body.hip, (-0.28 * body.facing, dy))
            pen.line([start, _add(start, (-0.12 * body.facing, 0.0))], st.accent, 0.5)


def _sitting(pen: _Pen, rng: np.random.Generator) -> None:
    """Side view, seated on a chair: bent at hip and knee, hands on the lap."""
    st = pen.style
    hip = _hip(rng, -0.05, 0.12)
    _chair(pen, (hip[0], hip[1] + 0.03), st.prop)
    _person(pen, rng, st.figure, hip=hip, torso=-95.0,
            hands=((0.16, 0.3), (0.2, 0.25)), elbows=(1.0, 1.0),
            feet=((0.24, 0.22), (0.2, 0.24)), knees=(-1.0, -1.0), jitter=0.012)


def _sleeping(pen: _Pen, rng: np.random.Generator) -> None:
    """Lying flat on a bed with a pillow, "Z"s floating above the head."""
    st = pen.style
    top = 0.12
    pen.rect((0.0, top + 0.05), 0.9, 0.1, st.prop)
    pen.line([(-0.44, top - 0.12), (-0.44, 0.35)], st.prop, 1.0)
    pen.line([(0.42, top), (0.42, 0.35)], st.prop, 1.0)
    pen.ellipse((-0.34, top - 0.025), 0.08, 0.035, st.accent)
    body = _person(pen, rng, st.figure, hip=(0.02, top - 0.03), torso=180.0,
                   hands=((0.25, 0.02), (0.2, 0.06)), elbows=(-1.0, -1.0),
                   feet=((0.44, 0.0), (0.43, -0.03)), knees=(1.0, 1.0), jitter=0.01)
    x, y = body.head[0] + 0.1, body.head[1] - 0.12
    for k in range(int(rng.integers(1, 4))):
        s = 0.04 + 0.02 * k
        # Offsets follow the image's mirror so the letter reads as Z, never as its reflection.
        f = pen.sign * s
        pen.line([(x, y), (x + f, y), (x, y + s), (x + f, y + s)], st.accent, 0.5)
        x, y = x + s + 0.03, y - s - 0.03


def _texting(pen: _Pen, rng: np.random.Generator) -> None:
    """Head bowed over a phone held in both hands in front of the body."""
    st = pen.style
    at = (0.14, rng.uniform(0.08, 0.15))
    body = _person(pen, rng, st.figure, hip=_hip(rng, -0.06, 0.06), tilt=40.0,
                   hands=(at, (at[0] + 0.02, at[1] - 0.02)), feet=_STAND,
                   elbows=(1.0, 1.0), jitter=0.01)
    grip = ((body.hands[0][0] + body.hands[1][0]) / 2, (body.hands[0][1] + body.hands[1][1]) / 2)
    _phone(pen, _add(grip, (0.0, -0.02)), body.forward(-35.0), st.prop, 1.5)


def _using_laptop(pen: _Pen, rng: np.random.Generator) -> None:
    """Seated at a table, hands on the keyboard of an open laptop."""
    st = pen.style
    top, torso = 0.16, -85.0
    hip = _hip(rng, -0.28, 0.13, 0.02)
    _chair(pen, (hip[0], hip[1] + 0.03), st.accent)
    _table(pen, -0.05, 0.45, top, 0.45, st.accent)
    hinge = (0.24, top - 0.03)
    pen.line([(0.0, hinge[1]), hinge], st.prop, 1.0)
    # The lid leans away from the user, so it is seen edge-on as a thick stroke.
    pen.line([hinge, _add(hinge, _dir(rng.uniform(-115.0, -95.0)), 0.22)], st.prop, 1.6)
    keys = (0.06, top - 0.05)
    _person(pen, rng, st.figure, hip=hip, torso=torso, tilt=10.0,
            hands=(_grip(hip, torso, keys), _grip(hip, torso, (keys[0] + 0.03, keys[1]))),
            elbows=(1.0, 1.0), feet=((0.24, 0.22), (0.2, 0.24)), knees=(-1.0, -1.0),
            jitter=0.01)


_SCENES: dict[str, Scene] = {
    "calling": _calling,
    "clapping": _clapping,
    "cycling": _cycling,
    "dancing": _dancing,
    "drinking": _drinking,
    "eating": _eating,
    "fighting": _fighting,
    "hugging": _hugging,
    "laughing": _laughing,
    "listening_to_music": _listening,
    "running": _running,
    "sitting": _sitting,
    "sleeping": _sleeping,
    "texting": _texting,
    "using_laptop": _using_laptop,
}
assert tuple(_SCENES) == HAR_CLASSES
