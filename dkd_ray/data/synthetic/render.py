"""Pixels for the synthetic benchmarks: street-like backgrounds and people drawn as figures.

An identity is a bundle of attributes drawn from small shared palettes (upper/lower clothing
colour, clothing pattern, sleeve and leg style, hair, hat, bag, build), so any single cue is
shared by many identities while the combination is (nearly) unique. Each appearance varies
the pose, facing, lighting and colour slightly; occluders and other people may hide parts.
numpy does the per-pixel work (backgrounds, lighting, noise), PIL.ImageDraw the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .scene import UNLABELLED, ImagePlan

UPPER_PALETTE = np.array(
    [[200, 30, 30], [30, 60, 190], [40, 150, 60], [235, 200, 40], [240, 240, 235], [30, 30, 35],
     [130, 40, 160], [240, 130, 30], [120, 190, 230], [150, 90, 50], [230, 120, 170],
     [110, 115, 120]], dtype=np.float64,
)  # fmt: skip
LOWER_PALETTE = np.array(
    [[25, 30, 60], [30, 30, 30], [90, 95, 100], [170, 150, 110], [60, 80, 40], [120, 30, 35],
     [200, 200, 200], [70, 110, 170]], dtype=np.float64,
)  # fmt: skip
SKIN_PALETTE = np.array([[250, 215, 185], [225, 180, 140], [180, 130, 90], [120, 80, 55]], float)
HAIR_PALETTE = np.array(
    [[20, 15, 10], [90, 55, 25], [200, 170, 100], [140, 140, 140], [150, 50, 20]], float
)
ACCENT_PALETTE = np.concatenate([UPPER_PALETTE, LOWER_PALETTE])  # patterns, hats, bags, shoes

SOLID, STRIPES, CHECKS, HALVES = range(4)
TROUSERS, SHORTS, SKIRT = range(3)
NO_BAG, BACKPACK, SHOULDER_BAG = range(3)


@dataclass
class Appearances:
    """Attributes of ``n`` people, one row each (identities, or one-off bystanders)."""

    upper: np.ndarray  # [n, 3] RGB
    lower: np.ndarray
    accent: np.ndarray  # pattern colour
    skin: np.ndarray
    hair: np.ndarray
    shoes: np.ndarray
    hat: np.ndarray  # [n, 3] RGB, NaN row = no hat
    bag: np.ndarray  # [n, 3] RGB of the bag
    pattern: np.ndarray  # [n] SOLID | STRIPES | CHECKS | HALVES
    stripes: np.ndarray  # [n] number of stripes / check rows
    long_sleeves: np.ndarray  # [n] bool
    legwear: np.ndarray  # [n] TROUSERS | SHORTS | SKIRT
    bag_kind: np.ndarray  # [n] NO_BAG | BACKPACK | SHOULDER_BAG
    build: np.ndarray  # [n] torso width factor
    leg_fraction: np.ndarray  # [n] share of the height below the hips

    def __len__(self) -> int:
        return len(self.pattern)


def sample_appearances(rng: np.random.Generator, n: int) -> Appearances:
    """``n`` random people. Palettes are small on purpose: attributes repeat across people."""

    def pick(palette: np.ndarray, jitter: float) -> np.ndarray:
        base = palette[rng.integers(len(palette), size=n)]
        return np.clip(base + rng.normal(0, jitter, size=(n, 3)), 0, 255)

    hat = pick(ACCENT_PALETTE, 10)
    hat[rng.random(n) > 0.22] = np.nan
    return Appearances(
        upper=pick(UPPER_PALETTE, 14),
        lower=pick(LOWER_PALETTE, 12),
        accent=pick(ACCENT_PALETTE, 10),
        skin=pick(SKIN_PALETTE, 8),
        hair=pick(HAIR_PALETTE, 8),
        shoes=pick(ACCENT_PALETTE, 10) * 0.6,
        hat=hat,
        bag=pick(ACCENT_PALETTE, 10),
        pattern=rng.choice(4, size=n, p=[0.45, 0.25, 0.15, 0.15]),
        stripes=rng.integers(2, 5, size=n),
        long_sleeves=rng.random(n) < 0.6,
        legwear=rng.choice(3, size=n, p=[0.7, 0.18, 0.12]),
        bag_kind=rng.choice(3, size=n, p=[0.6, 0.2, 0.2]),
        build=rng.uniform(0.8, 1.15, size=n),
        leg_fraction=rng.uniform(0.42, 0.5, size=n),
    )


def camera_look(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A camera's colour cast: per-channel gain and offset applied to its whole frame."""
    return rng.uniform(0.82, 1.12, size=3), rng.uniform(-12, 12, size=3)


def render_background(rng: np.random.Generator, width: int, height: int, horizon: float) -> np.ndarray:
    """float32 [H, W, 3]: a wall/sky gradient above the horizon, a textured ground below,
    with buildings, windows and a few trees."""
    ys = np.arange(height, dtype=np.float32)[:, None, None]
    top, mid = rng.uniform(60, 230, size=(2, 3)).astype(np.float32)
    near, far = rng.uniform(40, 200, size=(2, 3)).astype(np.float32)
    t_sky = np.clip(ys / max(horizon, 1), 0, 1)
    t_ground = np.clip((ys - horizon) / max(height - horizon, 1), 0, 1)
    sky = top + (mid - top) * t_sky
    ground = far + (near - far) * t_ground
    img = np.repeat(np.where(ys < horizon, sky, ground), width, axis=1)
    # ground texture: paving stripes getting wider towards the camera
    period = rng.uniform(6, 14)
    depth = np.clip(ys[:, :, 0] - horizon, 0, None)
    stripes = (np.floor(depth**1.3 / period) % 2).astype(np.float32)
    img += (ys >= horizon) * stripes[:, :, None] * np.float32(rng.uniform(-14, 14))

    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    x = -rng.uniform(0, 0.2) * width
    while x < width:  # a row of buildings standing on the horizon
        bw = rng.uniform(0.12, 0.35) * width
        bh = rng.uniform(0.3, 0.95) * horizon
        colour = tuple(int(c) for c in rng.uniform(50, 220, size=3))
        draw.rectangle([x, horizon - bh, x + bw, horizon], fill=colour)
        if bw > 12 and bh > 12 and rng.random() < 0.8:
            win = tuple(int(c) for c in np.clip(np.array(colour) * rng.uniform(0.4, 1.5), 0, 255))
            step = max(bw / rng.integers(3, 6), 4)
            for wx in np.arange(x + step * 0.3, x + bw - step * 0.5, step):
                for wy in np.arange(horizon - bh + step * 0.3, horizon - step * 0.6, step * 1.2):
                    draw.rectangle([wx, wy, wx + step * 0.45, wy + step * 0.55], fill=win)
        x += bw + rng.uniform(0, 0.08) * width
    for _ in range(rng.integers(0, 3)):  # trees
        tx, size = rng.uniform(0, width), rng.uniform(0.15, 0.35) * height
        draw.rectangle(
            [tx - size * 0.06, horizon - size * 0.6, tx + size * 0.06, horizon + size * 0.05],
            fill=(90, 60, 30),
        )
        green = (int(rng.uniform(20, 80)), int(rng.uniform(90, 160)), int(rng.uniform(20, 70)))
        draw.ellipse(
            [tx - size * 0.35, horizon - size * 1.1, tx + size * 0.35, horizon - size * 0.45], fill=green
        )
    return np.asarray(canvas, dtype=np.float32)


def render_image(
    plan: ImagePlan,
    identities: Appearances,
    rng: np.random.Generator,
    background: np.ndarray | None = None,
    look: tuple[np.ndarray, np.ndarray] | None = None,
) -> Image.Image:
    """Draw every person of ``plan`` (identity rows from ``identities``; bystanders random)
    over ``background`` (a new one when None), far to near, with occluders in between."""
    if background is None:
        background = render_background(rng, plan.width, plan.height, plan.horizon)
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)

    bystanders = sample_appearances(rng, len(plan.boxes))
    items = []  # (depth = bottom y, kind, index)
    for k in np.flatnonzero(plan.drawn):
        items.append((plan.boxes[k, 1] + plan.boxes[k, 3], 0, int(k)))
    occluders = _sample_occluders(rng, plan)
    items += [(o[1] + o[3], 1, i) for i, o in enumerate(occluders)]
    for _, kind, k in sorted(items):
        if kind == 1:
            x, y, w, h, colour, shape = occluders[k]
            if shape == 0:
                draw.rectangle([x, y, x + w, y + h], fill=colour)
            else:
                draw.rounded_rectangle([x, y, x + w, y + h], radius=max(w * 0.15, 1), fill=colour)
            continue
        ident = plan.identity[k]
        source, row = (bystanders, k) if ident == UNLABELLED else (identities, int(ident))
        _draw_person(draw, plan.boxes[k], source, row, rng)

    img = np.asarray(canvas, dtype=np.float32)
    # lighting: global brightness and a smooth horizontal gradient, the camera's cast, noise
    xs = np.linspace(-1, 1, plan.width, dtype=np.float32)[None, :, None]
    factor = np.float32(rng.uniform(0.8, 1.15)) + np.float32(rng.uniform(-0.12, 0.12)) * xs
    offset = np.float32(0)
    if look is not None:
        factor = factor * look[0].astype(np.float32)
        offset = look[1].astype(np.float32)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(2, 6))
    img = img * factor
    img += noise + offset
    np.clip(img, 0, 255, out=img)
    return Image.fromarray(img.astype(np.uint8))


def _sample_occluders(rng: np.random.Generator, plan: ImagePlan) -> list[tuple]:
    """Poles, bins and benches standing in front of some people: partial occlusion."""
    out = []
    people = plan.boxes[plan.drawn]
    for _ in range(rng.integers(0, 3)):
        if len(people) and rng.random() < 0.7:  # in front of someone's legs
            px, py, pw, ph = people[rng.integers(len(people))]
            bottom = py + ph + rng.uniform(0.01, 0.08) * ph
            scale = ph
            x = px + rng.uniform(-0.4, 0.8) * pw
        else:
            bottom = rng.uniform(plan.horizon, plan.height)
            scale = 0.7 * plan.height * (bottom - plan.horizon) / max(plan.height - plan.horizon, 1)
            x = rng.uniform(0, plan.width)
        if rng.random() < 0.4:  # pole
            w, h, shape = 0.08 * scale, rng.uniform(0.9, 1.4) * scale, 0
        else:  # bin / bench / box: covers the lower legs at most
            w, h, shape = rng.uniform(0.4, 1.0) * scale, rng.uniform(0.18, 0.4) * scale, 1
        colour = tuple(int(c) for c in rng.uniform(30, 200, size=3))
        out.append((x, bottom - h, w, h, colour, shape))
    return out


def _rgb(colour: np.ndarray, light: float, tint: np.ndarray) -> tuple[int, int, int]:
    c = np.clip(colour * light + tint, 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


def _draw_person(
    draw: ImageDraw.ImageDraw, box: np.ndarray, a: Appearances, i: int, rng: np.random.Generator
) -> None:
    """A figure filling box ``[x y w h]``: legs, torso with pattern, arms, head, hat, bag."""
    x, y, w, h = (float(v) for v in box)
    light, tint = rng.uniform(0.8, 1.15), rng.normal(0, 5, size=3)  # per-appearance lighting
    col = {
        name: _rgb(getattr(a, name)[i], light, tint)
        for name in ("upper", "lower", "accent", "skin", "hair", "shoes", "bag")
    }
    facing = 1 if rng.random() < 0.5 else -1
    cx = x + w / 2 + rng.uniform(-0.04, 0.04) * w
    hip = y + (1 - a.leg_fraction[i]) * h
    shoulder = y + 0.17 * h
    half = min(0.24 * w * a.build[i], 0.33 * w)
    arm_w = max(0.1 * w, 1.0)

    # bag behind the body (backpack) is drawn first
    if a.bag_kind[i] == BACKPACK:
        bx = cx - facing * half * 0.9
        draw.rectangle(
            [bx - half * 0.6, shoulder + 0.02 * h, bx + half * 0.6, hip - 0.02 * h], fill=col["bag"]
        )

    # legs: two quads from the hips to the feet, spread by the stride
    stride = rng.uniform(0.0, 0.18) * w
    leg_w = half * 0.85
    feet_y = y + h * 0.965
    lower_end = hip + (feet_y - hip) * (0.45 if a.legwear[i] == SHORTS else 1.0)
    for side in (-1, 1):
        top_in, top_out = cx + side * 0.02 * w, cx + side * (half * 0.95)
        foot_c = cx + side * (half * 0.5 + stride / 2)
        leg = [
            (top_in, hip),
            (top_out, hip),
            (foot_c + side * leg_w / 2, feet_y),
            (foot_c - side * leg_w / 2, feet_y),
        ]
        draw.polygon(leg, fill=col["skin"])
        frac = (lower_end - hip) / max(feet_y - hip, 1e-6)
        cover = [
            (top_in, hip),
            (top_out, hip),
            (top_out + (leg[2][0] - top_out) * frac, lower_end),
            (top_in + (leg[3][0] - top_in) * frac, lower_end),
        ]
        draw.polygon(cover, fill=col["lower"])
        draw.rectangle(
            [
                min(leg[2][0], leg[3][0]) - 0.03 * w,
                feet_y - 0.01 * h,
                max(leg[2][0], leg[3][0]) + 0.03 * w,
                y + h,
            ],
            fill=col["shoes"],
        )
    if a.legwear[i] == SKIRT:
        draw.polygon(
            [
                (cx - half, hip - 0.02 * h),
                (cx + half, hip - 0.02 * h),
                (cx + half * 1.35, hip + 0.22 * h),
                (cx - half * 1.35, hip + 0.22 * h),
            ],
            fill=col["lower"],
        )

    # arms: sleeves from the shoulders down to the hips, hands below
    swing = rng.uniform(-0.08, 0.08) * w
    for side in (-1, 1):
        sx = cx + side * (half + arm_w / 2)
        hx = sx + side * rng.uniform(0.0, 0.06) * w + side * swing
        hand_y = hip + 0.03 * h
        sleeve_end = hand_y - 0.03 * h if a.long_sleeves[i] else shoulder + 0.12 * h
        draw.line([(sx, shoulder + arm_w / 2), (hx, hand_y)], fill=col["skin"], width=max(int(arm_w), 1))
        frac = (sleeve_end - shoulder) / max(hand_y - shoulder, 1e-6)
        draw.line(
            [(sx, shoulder + arm_w / 2), (sx + (hx - sx) * frac, sleeve_end)],
            fill=col["upper"],
            width=max(int(arm_w * 1.15), 1),
        )

    # torso with its pattern
    t0, t1 = (cx - half, shoulder), (cx + half, hip)
    draw.rectangle([t0, t1], fill=col["upper"])
    pattern, n = a.pattern[i], int(a.stripes[i])
    th = hip - shoulder
    if pattern == STRIPES:
        for s in range(n):
            sy = shoulder + th * (s + 0.5) / (n + 0.5)
            draw.rectangle([cx - half, sy, cx + half, sy + th / (2 * n + 1)], fill=col["accent"])
    elif pattern == CHECKS:
        cw, ch = 2 * half / 3, th / (n + 1)
        for r in range(n + 1):
            for c in range(3):
                if (r + c) % 2:
                    draw.rectangle(
                        [
                            cx - half + c * cw,
                            shoulder + r * ch,
                            cx - half + (c + 1) * cw,
                            shoulder + (r + 1) * ch,
                        ],
                        fill=col["accent"],
                    )
    elif pattern == HALVES:
        draw.rectangle([cx - half, shoulder + th * 0.5, cx + half, hip], fill=col["accent"])
    if a.bag_kind[i] == SHOULDER_BAG:
        bx = cx + facing * half * 0.9
        draw.line(
            [(cx - facing * half * 0.8, shoulder), (bx, hip - 0.04 * h)],
            fill=col["bag"],
            width=max(int(0.03 * w), 1),
        )
        draw.rectangle([bx - 0.1 * w, hip - 0.08 * h, bx + 0.12 * w, hip + 0.04 * h], fill=col["bag"])

    # head: face, hair on top, optional hat
    r = min(0.075 * h, 0.3 * w)
    hy = y + 0.095 * h
    hx = cx + facing * 0.02 * w
    draw.rectangle([cx - r * 0.35, hy + r * 0.6, cx + r * 0.35, shoulder + 1], fill=col["skin"])  # neck
    draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=col["skin"])
    draw.chord([hx - r, hy - r, hx + r, hy + r], 180, 360, fill=col["hair"])
    if not np.isnan(a.hat[i, 0]):
        hat = _rgb(a.hat[i], light, tint)
        draw.rectangle([hx - r * 1.25, hy - r * 0.35, hx + r * 1.25, hy - r * 0.1], fill=hat)
        draw.rectangle([hx - r * 0.85, y, hx + r * 0.85, hy - r * 0.3], fill=hat)
