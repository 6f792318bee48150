"""What a drawn face is: every random choice for one face (:func:`sample_traits`) and the labels those choices
give (:func:`labels_of`). facedata/draw.py paints the face from the same choices.

What is drawn, and how each of the 40 CelebA attributes is set (*drawn*: a visual cue is drawn iff the
attribute is +1; *derived*: a deterministic function of drawn features; none is left random):

* gender - women mostly have long hair (behind the shoulders), lipstick, eye shadow, earrings; men mostly
  short hair, beards / moustaches / stubble, neckties. ``Male`` is the drawn gender.
* skin tone - five tone levels, one per UTKFace race (White, Black, Asian, Indian, Others), with a small
  per-face jitter and lighting; ``Pale_Skin`` (drawn) is an extra-light White tone.
* age 1-90 - children have rounder faces with larger, lower eyes; forehead wrinkles and crow's feet grow
  from about 35, grey hair becomes likely from about 50, baldness and receding hairlines in older men.
  ``Young`` (derived) is age < 35.
* hair - colour black / brown / blond / red / grey (``Black_Hair``, ``Brown_Hair``, ``Blond_Hair``,
  ``Gray_Hair``: drawn, all -1 when bald); ``Bald``, ``Receding_Hairline`` (a higher hairline), ``Bangs``
  (a zig-zag fringe), ``Wavy_Hair`` / ``Straight_Hair`` (the outline of long hair; both -1 for short hair),
  ``Sideburns`` (strips beside the ears) are drawn.
* ``Wearing_Hat`` a band plus crown above the forehead; ``Eyeglasses`` two rings, a bridge and temples
  (sometimes dark lenses); ``Wearing_Earrings``, ``Wearing_Necklace``, ``Wearing_Necktie``: drawn.
* mouth - ``Smiling`` is an upward curve (corners above the middle) instead of a flat line;
  ``Mouth_Slightly_Open`` shows teeth or a dark opening; ``Big_Lips`` a thicker line;
  ``Wearing_Lipstick`` red lips; ``Heavy_Makeup`` lipstick plus eye shadow.
* beard - ``No_Beard`` (derived) is -1 when any of beard, ``Goatee``, ``Mustache`` is drawn;
  ``5_o_Clock_Shadow`` a faint darkening of the jaw.
* eyes, nose, cheeks - ``Arched_Eyebrows``, ``Bushy_Eyebrows``, ``Narrow_Eyes``, ``Bags_Under_Eyes``,
  ``Big_Nose``, ``Pointy_Nose``, ``Rosy_Cheeks``, ``High_Cheekbones`` (light cheekbone strokes),
  ``Chubby`` (a wider face) and ``Double_Chin`` are drawn; ``Oval_Face`` (derived) is a long, not chubby face.
* ``Blurry``: a Gaussian blur of the whole image.
* beauty 1-5 (derived, plus noise): higher for symmetric faces (the left eye is shifted and the mouth
  tilted by a drawn asymmetry), face proportions near an ideal aspect and eye spacing, smiling and make-up;
  lower for wrinkles and blur. ``Attractive`` (derived) is beauty >= 3.
"""

from __future__ import annotations

import numpy as np

from facedata.datasets import CELEBA_ATTRIBUTES, UTKFACE_RACES


def _b(flag: bool) -> int:
    return 1 if flag else -1


def sample_traits(rng: np.random.Generator, races: tuple[int, ...] | None) -> dict:
    """Every random choice for one face, before any geometry."""
    u = rng.random
    female = u() < 0.5
    age = int(rng.choice([rng.integers(1, 16), rng.integers(16, 46), rng.integers(46, 91)], p=[0.15, 0.55, 0.3]))
    race = int(rng.choice(races if races else range(len(UTKFACE_RACES))))
    adult = age >= 16
    man = not female and adult
    bald = man and age > 35 and u() < 0.5 * (age - 35) / 55
    gray_p = min(0.9, max(0.0, (age - 45) / 35))
    if u() < gray_p:
        hair = "gray"
    elif race == 0:
        hair = str(rng.choice(["black", "brown", "blond", "red"], p=[0.25, 0.35, 0.3, 0.1]))
    elif race == 4:
        hair = str(rng.choice(["black", "brown"]))
    else:
        hair = "black" if u() < 0.8 else "brown"
    long_hair = not bald and (u() < 0.85 if female else u() < 0.08)
    beard = man and u() < 0.25
    lipstick = female and age >= 14 and u() < 0.6
    smile = u() < 0.5
    f = {
        "female": female, "age": age, "race": race, "bald": bald, "hair": hair, "long_hair": long_hair,
        "wavy": long_hair and u() < 0.35,
        "receding": not bald and adult and (u() < (0.3 if not female and age > 30 else 0.04)),
        "bangs": not bald and u() < (0.28 if female else 0.12),
        "hat": u() < 0.12,
        "glasses": u() < 0.2, "sunglasses": u() < 0.25,
        "smile": smile, "open": u() < (0.5 if smile else 0.2),
        "beard": beard, "goatee": man and not beard and u() < 0.15,
        "mustache": man and u() < (0.7 if beard else 0.15),
        "stubble": man and not beard and u() < 0.2, "sideburns": man and not bald and u() < 0.2,
        "lipstick": lipstick, "eyeshadow": lipstick and u() < 0.6,
        "earrings": u() < (0.3 if female else 0.03), "necklace": female and u() < 0.15,
        "necktie": man and u() < 0.12,
        "pale": race == 0 and u() < 0.3,
        "blurry": u() < 0.06,
        "chubby": adult and u() < 0.08 + 0.1 * (age > 40),
        "narrow_eyes": u() < 0.12,
        "arched": u() < (0.5 if female else 0.08), "bushy": u() < (0.1 if female else 0.3),
        "bags": u() < min(0.8, max(0.03, (age - 30) / 50)),
        "big_lips": u() < 0.25, "big_nose": u() < 0.25, "pointy_nose": u() < 0.3,
        "rosy": u() < (0.15 if female else 0.04),
        "cheekbones": u() < (0.6 if smile else 0.12),
        "wrinkles": int(np.clip(round((age - 35) / 12 + rng.normal(0, 0.6)), 0, 4)) if age > 30 else 0,
        "asym": float(rng.beta(1.2, 4.0)),
        "aspect": float(rng.uniform(1.05, 1.2) if age < 13 else rng.uniform(1.18, 1.52)),
        "eye_dx": float(rng.uniform(0.18, 0.24)),
        "scale": float(rng.uniform(0.92, 1.08)),
    }  # fmt: skip
    f["double_chin"] = f["chubby"] and age > 30 and u() < 0.6
    return f


def labels_of(f: dict, rng: np.random.Generator, points) -> dict:
    """The labels of a face drawn from traits ``f`` with its 5 drawn ``points`` (left eye, right eye, nose tip,
    left and right mouth corner). ``rng`` gives the beauty score's noise: :func:`facedata.draw.draw_face` calls
    this after painting, so a seed draws the same faces as before this was its own module."""
    age = f["age"]
    aspect_pen = 4.0 * abs(f["aspect"] - 1.36) if age >= 13 else 0.3
    beauty = (
        3.75
        - 2.2 * f["asym"]
        - aspect_pen
        - 12.0 * abs(f["eye_dx"] - 0.21)
        - 0.15 * f["wrinkles"]
        + 0.3 * f["smile"]
        + 0.2 * f["eyeshadow"]
        - 0.4 * f["blurry"]
        + rng.normal(0, 0.2)
    )
    beauty = round(float(np.clip(beauty, 1.0, 5.0)), 6)
    man = not f["female"]
    has_hair = not f["bald"]
    flags = {
        "5_o_Clock_Shadow": f["stubble"], "Arched_Eyebrows": f["arched"], "Attractive": beauty >= 3.0,
        "Bags_Under_Eyes": f["bags"], "Bald": f["bald"], "Bangs": f["bangs"], "Big_Lips": f["big_lips"],
        "Big_Nose": f["big_nose"], "Black_Hair": has_hair and f["hair"] == "black",
        "Blond_Hair": has_hair and f["hair"] == "blond", "Blurry": f["blurry"],
        "Brown_Hair": has_hair and f["hair"] == "brown", "Bushy_Eyebrows": f["bushy"], "Chubby": f["chubby"],
        "Double_Chin": f["double_chin"], "Eyeglasses": f["glasses"], "Goatee": f["goatee"],
        "Gray_Hair": has_hair and f["hair"] == "gray", "Heavy_Makeup": f["eyeshadow"],
        "High_Cheekbones": f["cheekbones"], "Male": man, "Mouth_Slightly_Open": f["open"],
        "Mustache": f["mustache"], "Narrow_Eyes": f["narrow_eyes"],
        "No_Beard": not (f["beard"] or f["goatee"] or f["mustache"]),
        "Oval_Face": f["aspect"] >= 1.38 and not f["chubby"], "Pale_Skin": f["pale"],
        "Pointy_Nose": f["pointy_nose"], "Receding_Hairline": f["receding"], "Rosy_Cheeks": f["rosy"],
        "Sideburns": f["sideburns"], "Smiling": f["smile"], "Straight_Hair": f["long_hair"] and not f["wavy"],
        "Wavy_Hair": f["wavy"], "Wearing_Earrings": f["earrings"], "Wearing_Hat": f["hat"],
        "Wearing_Lipstick": f["lipstick"], "Wearing_Necklace": f["necklace"], "Wearing_Necktie": f["necktie"],
        "Young": age < 35,
    }  # fmt: skip
    return {
        "gender": int(f["female"]),
        "age": age,
        "race": f["race"],
        "beauty": beauty,
        "smile": int(f["smile"]),
        "eyeglasses": int(f["glasses"]),
        "attributes": [_b(flags[name]) for name in CELEBA_ATTRIBUTES],
        "landmarks": [int(v) for p in points for v in p],
        "hair_color": "none" if f["bald"] else f["hair"],
    }
