"""One drawn face with known attributes: :func:`draw_face`, what facedata/synth.py writes in the
datasets' formats and the tests paste into photos (facedata/compose.py).

How each attribute is drawn or derived, and every random choice: facedata/traits.py.

Every image also gets a random background with clutter, a few pixels of position and scale jitter, and mild
Gaussian pixel noise.

Drawn to be found by a face detector trained on photos (docs/faces.md has the measurements): the skin is
shaded (lit from the front and above, darker at the rim), with eye sockets, a nose shadow and nostrils, a
shadow under the lower lip and under the chin, and light on the forehead and cheeks. None of these depends
on an attribute or draws a random number, so a seed gives the same attributes and landmarks as before.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facedata.traits import labels_of, sample_traits

# One base skin tone per UTKFace race index (White, Black, Asian, Indian, Others).
SKIN_TONES = ((238, 200, 178), (92, 58, 40), (226, 188, 128), (168, 112, 72), (198, 148, 104))
PALE_TONE = (252, 226, 214)
HAIR_COLORS = {
    "black": (28, 22, 22),
    "brown": (100, 62, 34),
    "blond": (222, 188, 104),
    "red": (150, 56, 30),
    "gray": (172, 172, 176),
}


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def _shade(color, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * f))) for c in color)


def _ellipse_mask(w: float, h: float) -> Image.Image:
    m = Image.new("L", (max(1, round(w)), max(1, round(h))), 0)
    ImageDraw.Draw(m).ellipse((0, 0, m.width - 1, m.height - 1), fill=255)
    return m


def _shaded_skin(skin, w: float, h: float) -> Image.Image:
    """The face's skin lit from the front and a little above: full tone in the middle, about 30 % darker
    at the rim (a face's roundness is what a face detector sees first; a flat disc reads as a sticker)."""
    W, H = max(1, round(w)), max(1, round(h))
    xs = (np.arange(W, dtype=np.float32) + 0.5) / W * 2 - 1
    ys = (np.arange(H, dtype=np.float32) + 0.5) / H * 2 - 1
    r2 = np.clip(xs[None, :] ** 2 + ys[:, None] ** 2, 0, 1)
    light = 1.04 - 0.3 * r2 ** 1.5 - 0.06 * ys[:, None]
    arr = np.clip(np.asarray(skin, np.float32)[None, None, :] * light[..., None], 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")




def draw_face(
    rng: np.random.Generator, size: tuple[int, int] = (178, 218), *, races: tuple[int, ...] | None = None
) -> tuple[Image.Image, dict]:
    """Draw one face. Returns ``(RGB image, labels)``; labels holds ``gender`` (0 male / 1 female),
    ``age``, ``race`` (a UTKFace index; ``races`` limits the choice), ``beauty``, ``smile``, ``eyeglasses``,
    ``attributes`` (40 values +1/-1 in CelebA order), ``landmarks`` ([x1, y1, ... x5, y5] integer pixels:
    left eye, right eye, nose tip, left and right mouth corner) and ``hair_color``."""
    W, H = size
    f = sample_traits(rng, races)
    u = rng.random
    age = f["age"]

    # --- geometry ---------------------------------------------------------------------------------------
    base = min(W, H / 1.22)
    fw = base * 0.5 * f["scale"] * (1.15 if f["chubby"] else 1.0)
    fh = fw * f["aspect"] * (0.92 if f["chubby"] else 1.0)
    cx = W / 2 + rng.uniform(-0.035, 0.035) * W
    cy = H * 0.55 + rng.uniform(-0.03, 0.03) * H
    x0, x1, y0, y1 = cx - fw / 2, cx + fw / 2, cy - fh / 2, cy + fh / 2
    growth = min(1.0, max(0.0, (age - 1) / 17))
    eye_r = fw * (0.085 - 0.02 * growth)
    asym = f["asym"]
    ey = y0 + fh * (0.50 - 0.08 * growth)
    left_eye = (round(cx - fw * f["eye_dx"]), round(ey + asym * fw * 0.06))
    right_eye = (round(cx + fw * f["eye_dx"]), round(ey))
    nose = (round(cx), round(y0 + fh * (0.66 - 0.03 * growth)))
    mouth_y = y0 + fh * (0.80 - 0.02 * growth)
    mw = fw * (0.2 if f["smile"] else 0.16)
    tilt = asym * fw * 0.035
    left_mouth = (round(cx - mw), round(mouth_y + tilt))
    right_mouth = (round(cx + mw), round(mouth_y - tilt))

    skin = PALE_TONE if f["pale"] else SKIN_TONES[f["race"]]
    skin = tuple(int(np.clip(c + rng.integers(-7, 8), 0, 255)) for c in skin)
    line_skin = _shade(skin, 0.72)
    hair = HAIR_COLORS[f["hair"]]
    brow = _shade(hair, 0.55) if not f["bald"] else (60, 45, 35)

    # --- background ---------------------------------------------------------------------------------------
    bg = tuple(int(c) for c in rng.integers(30, 226, 3))
    img = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(img)
    for _ in range(3):
        bx, by = rng.integers(0, W), rng.integers(0, H)
        bw, bh = rng.integers(W // 8, W // 2), rng.integers(H // 8, H // 2)
        col = _mix(bg, tuple(int(c) for c in rng.integers(0, 256, 3)), 0.35)
        (d.ellipse if u() < 0.5 else d.rectangle)((bx, by, bx + bw, by + bh), fill=col)

    # --- long hair behind, shoulders, neck, neckwear ------------------------------------------------------
    if f["long_hair"]:
        top, bottom = y0 - 0.14 * fh, y1 + 0.4 * fh
        left, right = x0 - 0.17 * fw, x1 + 0.17 * fw
        if f["wavy"]:
            n = 14
            ys = np.linspace(cy - 0.1 * fh, bottom, n)
            amp = 0.05 * fw
            side_l = [(left + amp * math.sin(i * 1.6), y) for i, y in enumerate(ys)]
            side_r = [(right + amp * math.sin(i * 1.6 + 1), y) for i, y in enumerate(ys)]
            d.polygon(side_l + side_r[::-1], fill=hair)
            d.ellipse((left, top, right, cy + 0.2 * fh), fill=hair)
        else:
            d.rounded_rectangle((left, top, right, bottom), radius=int(0.45 * fw), fill=hair)
    clothes = tuple(int(c) for c in rng.integers(20, 236, 3))
    d.ellipse((cx - 1.15 * fw, y1 + 0.12 * fh, cx + 1.15 * fw, y1 + 1.4 * fh), fill=clothes)
    d.rectangle((cx - 0.19 * fw, y1 - 0.15 * fh, cx + 0.19 * fw, y1 + 0.22 * fh), fill=_shade(skin, 0.9))
    d.rectangle((cx - 0.19 * fw, y1 - 0.15 * fh, cx + 0.19 * fw, y1 + 0.06 * fh), fill=_shade(skin, 0.68))  # chin shadow
    if f["necktie"]:
        d.polygon([(cx - 0.2 * fw, y1 + 0.16 * fh), (cx, y1 + 0.3 * fh), (cx + 0.2 * fw, y1 + 0.16 * fh)],
                  fill=(245, 245, 245))
        tie = tuple(int(c) for c in rng.integers(0, 200, 3))
        d.polygon([(cx - 0.05 * fw, y1 + 0.22 * fh), (cx + 0.05 * fw, y1 + 0.22 * fh),
                   (cx + 0.09 * fw, y1 + 0.7 * fh), (cx, y1 + 0.8 * fh), (cx - 0.09 * fw, y1 + 0.7 * fh)], fill=tie)
    if f["necklace"]:
        d.arc((cx - 0.3 * fw, y1 - 0.05 * fh, cx + 0.3 * fw, y1 + 0.3 * fh), 20, 160, fill=(230, 200, 60),
              width=max(2, int(fw * 0.03)))

    # --- ears, back hair, face ------------------------------------------------------------------------------
    ear_top, ear_bot = ey - 0.06 * fh, nose[1] + 0.03 * fh
    for ex0, ex1 in ((x0 - 0.07 * fw, x0 + 0.06 * fw), (x1 - 0.06 * fw, x1 + 0.07 * fw)):
        d.ellipse((ex0, ear_top, ex1, ear_bot), fill=_shade(skin, 0.93))
        if f["earrings"]:
            r = max(2.0, fw * 0.035)
            mx = (ex0 + ex1) / 2
            d.ellipse((mx - r, ear_bot - r * 0.5, mx + r, ear_bot + 1.5 * r), fill=(235, 205, 70))
    if not f["bald"]:
        d.ellipse((x0 - 0.06 * fw, y0 - 0.11 * fh, x1 + 0.06 * fw, y0 + 0.6 * fh), fill=hair)
    img.paste(_shaded_skin(skin, fw, fh), (round(x0), round(y0)), _ellipse_mask(fw, fh))
    lit = _mix(skin, (255, 255, 255), 0.16)  # where the light catches: forehead and the tops of the cheeks
    d.ellipse((cx - 0.22 * fw, y0 + 0.22 * fh, cx + 0.22 * fw, y0 + 0.36 * fh), fill=lit)
    for side in (-1, 1):
        hx = cx + side * fw * 0.24
        d.ellipse((hx - 0.1 * fw, ey + 0.1 * fh, hx + 0.1 * fw, ey + 0.17 * fh), fill=lit)
    if f["sideburns"]:
        for sx in (x0 + 0.02 * fw, x1 - 0.08 * fw):
            d.rectangle((sx, y0 + 0.22 * fh, sx + 0.06 * fw, ey + 0.08 * fh), fill=hair)

    # --- forehead: wrinkles, hair cap, bangs, hat ---------------------------------------------------------
    for j in range(f["wrinkles"]):
        wy = y0 + fh * (0.27 + 0.035 * j)
        d.line((cx - 0.2 * fw, wy, cx + 0.2 * fw, wy), fill=line_skin, width=max(1, int(fw * 0.012)))
    if not f["bald"]:
        hairline = 0.1 if f["receding"] else 0.21
        deg = math.degrees(math.asin(1 - 2 * hairline))
        d.chord((x0, y0, x1, y1), 180 + deg, 360 - deg, fill=hair)
    if f["bangs"]:
        top = y0 + 0.05 * fh
        bottom = ey - eye_r - 0.045 * fh
        xs = np.linspace(x0 + 0.08 * fw, x1 - 0.08 * fw, 9)
        pts = [(xs[0], top)] + [(x, bottom - (0.05 * fh if i % 2 else 0)) for i, x in enumerate(xs)] + [(xs[-1], top)]
        d.polygon(pts, fill=hair)
    if f["hat"]:
        hat = tuple(int(c) for c in rng.integers(0, 256, 3))
        d.rounded_rectangle((x0 + 0.04 * fw, y0 - 0.32 * fh, x1 - 0.04 * fw, y0 + 0.12 * fh),
                            radius=int(0.2 * fw), fill=hat)
        d.rectangle((x0 - 0.1 * fw, y0 + 0.03 * fh, x1 + 0.1 * fw, y0 + 0.15 * fh), fill=_shade(hat, 0.6))

    # --- eyes ------------------------------------------------------------------------------------------------
    iris = tuple(int(c) for c in (rng.choice([(70, 45, 25), (40, 30, 25), (60, 100, 150), (80, 110, 70)])))
    for k, (ex, eyy) in enumerate((left_eye, right_eye)):
        r = eye_r * (1 + (0.25 * asym if k == 0 else 0))
        rv = r * (0.42 if f["narrow_eyes"] else 0.68)
        # eye socket: the shadow between brow and cheek that makes a face read as one (all faces)
        d.ellipse((ex - 1.45 * r, eyy - 1.35 * r, ex + 1.45 * r, eyy + 0.85 * r), fill=_shade(skin, 0.8))
        if f["eyeshadow"]:
            d.ellipse((ex - 1.25 * r, eyy - 1.25 * r, ex + 1.25 * r, eyy + 0.3 * r), fill=(120, 70, 140))
        d.ellipse((ex - r, eyy - rv, ex + r, eyy + rv), fill=(248, 248, 248), outline=line_skin)
        ri = min(rv, r * 0.5)
        d.ellipse((ex - ri, eyy - ri, ex + ri, eyy + ri), fill=iris)
        rp = ri * 0.45
        d.ellipse((ex - rp, eyy - rp, ex + rp, eyy + rp), fill=(10, 10, 10))
        by = eyy - r - 0.05 * fh
        bw = max(1, int(fw * (0.055 if f["bushy"] else 0.028)))
        if f["arched"]:
            d.arc((ex - 1.3 * r, by - 0.4 * r, ex + 1.3 * r, by + 0.9 * r), 200, 340, fill=brow, width=bw)
        else:
            d.line((ex - 1.3 * r, by + 0.1 * r, ex + 1.3 * r, by + 0.1 * r), fill=brow, width=bw)
        if f["bags"]:
            d.arc((ex - r, eyy, ex + r, eyy + 1.2 * r), 20, 160, fill=line_skin, width=max(1, int(fw * 0.012)))
        if f["wrinkles"] >= 2:
            side = -1 if k == 0 else 1
            ox = ex + side * 1.2 * r
            for dy in (-0.4, 0, 0.4):
                d.line((ox, eyy + dy * r, ox + side * 0.5 * r, eyy + dy * 1.6 * r), fill=line_skin, width=1)

    # --- cheeks, beard, nose, mouth -----------------------------------------------------------------------
    cheek_y = (nose[1] + mouth_y) / 2 - 0.04 * fh
    if f["rosy"]:
        for ex, _ in (left_eye, right_eye):
            cr = 0.09 * fw
            d.ellipse((ex - cr, cheek_y - cr * 0.7, ex + cr, cheek_y + cr * 0.7), fill=_mix(skin, (230, 70, 90), 0.45))
    if f["cheekbones"]:
        for ex, _ in (left_eye, right_eye):
            d.arc((ex - 0.12 * fw, cheek_y - 0.1 * fh, ex + 0.12 * fw, cheek_y), 30, 150,
                  fill=_mix(skin, (255, 255, 255), 0.45), width=max(1, int(fw * 0.02)))
    if f["beard"] or f["stubble"]:
        col = _shade(hair, 0.85) if f["beard"] else _mix(skin, _shade(hair, 0.8), 0.3)
        d.chord((x0, y0, x1, y1), 12, 168, fill=col)
    if f["double_chin"]:
        d.arc((cx - 0.22 * fw, y1 - 0.05 * fh, cx + 0.22 * fw, y1 + 0.07 * fh), 20, 160, fill=line_skin,
              width=max(1, int(fw * 0.02)))
    if f["goatee"]:
        top = mouth_y + 0.045 * fh
        d.polygon([(cx - 0.09 * fw, top), (cx + 0.09 * fw, top), (cx + 0.12 * fw, y1 - 0.05 * fh),
                   (cx, y1 + 0.01 * fh), (cx - 0.12 * fw, y1 - 0.05 * fh)], fill=_shade(hair, 0.85))
    nw = fw * (0.1 if f["big_nose"] else 0.065)
    nx, ny = nose
    # nose: a shadow down one side and under the tip, a lit bridge, nostrils
    d.polygon([(nx - 0.35 * nw, ey + 0.08 * fh), (nx - 0.15 * nw, ey + 0.08 * fh), (nx - 0.2 * nw, ny - 0.5 * nw),
               (nx - 1.1 * nw, ny - 0.2 * nw)], fill=_shade(skin, 0.82))
    d.ellipse((nx - 1.1 * nw, ny - 0.45 * nw, nx + 1.1 * nw, ny + 0.45 * nw), fill=_shade(skin, 0.78))
    d.line((nx + 0.15 * nw, ey + 0.06 * fh, nx + 0.15 * nw, ny - 0.8 * nw), fill=_shade(skin, 1.12),
           width=max(1, int(fw * 0.02)))
    for side in (-1, 1):
        d.ellipse((nx + side * 0.45 * nw - 0.22 * nw, ny - 0.25 * nw, nx + side * 0.45 * nw + 0.22 * nw, ny + 0.1 * nw),
                  fill=_shade(skin, 0.45))
    d.line((nx, ey + 0.05 * fh, nx - 0.3 * nw, ny - 0.6 * nw), fill=line_skin, width=max(1, int(fw * 0.012)))
    if f["pointy_nose"]:
        d.line([(nx - nw, ny - 0.8 * nw), (nx, ny), (nx + nw, ny - 0.8 * nw)], fill=line_skin,
               width=max(1, int(fw * 0.02)), joint="curve")
    else:
        d.arc((nx - nw, ny - 1.2 * nw, nx + nw, ny), 0, 180, fill=line_skin, width=max(1, int(fw * 0.02)))
    if f["mustache"]:
        my = (ny + mouth_y) / 2 + 0.01 * fh
        d.polygon([(cx - 0.2 * fw, mouth_y - 0.005 * fh), (cx - 0.12 * fw, my - 0.025 * fh),
                   (cx + 0.12 * fw, my - 0.025 * fh), (cx + 0.2 * fw, mouth_y - 0.005 * fh),
                   (cx, my + 0.02 * fh)], fill=_shade(hair, 0.8))
    lip = (200, 30, 55) if f["lipstick"] else _mix(_shade(skin, 0.75), (150, 60, 60), 0.5)
    lw = max(1, int(fw * (0.055 if f["big_lips"] else 0.026)))
    # the shadow under the lower lip
    d.chord((cx - 0.6 * mw, mouth_y + 0.02 * fh, cx + 0.6 * mw, mouth_y + 0.1 * fh), 0, 180, fill=_shade(skin, 0.82))
    depth = 0.07 * fh if f["smile"] else 0.0
    ts = np.linspace(0.0, 1.0, 13)

    def curve(bulge: float) -> list[tuple[float, float]]:
        (lx, ly), (rx, ry) = left_mouth, right_mouth
        return [(lx + t * (rx - lx), ly + t * (ry - ly) + bulge * 4 * t * (1 - t)) for t in ts]

    if f["open"]:
        if f["smile"]:
            upper, lower, inside = curve(0.25 * depth), curve(depth), (245, 245, 240)
        else:
            gap = 0.025 * fh
            upper, lower, inside = curve(-gap), curve(gap), (70, 20, 25)
        d.polygon(upper + lower[::-1], fill=inside)
        d.line(upper, fill=lip, width=lw, joint="curve")
        d.line(lower, fill=lip, width=lw, joint="curve")
    else:
        d.line(curve(depth), fill=lip, width=lw, joint="curve")

    # --- glasses ----------------------------------------------------------------------------------------------
    if f["glasses"]:
        frame = tuple(int(c) for c in rng.choice([(20, 20, 20), (90, 60, 30), (150, 150, 160)]))
        gr = eye_r * 1.45
        gw = max(2, int(fw * 0.025))
        for ex, eyy in (left_eye, right_eye):
            box = (ex - gr, eyy - gr * 0.8, ex + gr, eyy + gr * 0.8)
            if f["sunglasses"]:
                d.ellipse(box, fill=(25, 25, 35), outline=frame, width=gw)
            else:
                d.ellipse(box, outline=frame, width=gw)
        d.line((left_eye[0] + gr, left_eye[1], right_eye[0] - gr, right_eye[1]), fill=frame, width=gw)
        d.line((left_eye[0] - gr, left_eye[1], x0 - 0.03 * fw, ey - 0.02 * fh), fill=frame, width=gw)
        d.line((right_eye[0] + gr, right_eye[1], x1 + 0.03 * fw, ey - 0.02 * fh), fill=frame, width=gw)

    # --- camera: blur, lighting, noise ----------------------------------------------------------------
    if f["blurry"]:
        img = img.filter(ImageFilter.GaussianBlur(radius=max(1.5, W / 90)))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * float(rng.uniform(0.92, 1.08)) + rng.standard_normal(arr.shape, dtype=np.float32) * float(
        rng.uniform(2.0, 5.0)
    )
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    # --- labels ----------------------------------------------------------------------------------------------
    labels = labels_of(f, rng, (left_eye, right_eye, nose, left_mouth, right_mouth))
    return img, labels
