"""GenEval's 10 colour names with fixed RGB prototypes, the 6 shape classes, the background,
their Chinese names, and the sRGB -> CIELAB conversion the detector measures colours in."""

from __future__ import annotations

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 225, 30), "green": (40, 170, 60),
    "blue": (35, 75, 220), "purple": (130, 50, 170), "pink": (245, 130, 190), "brown": (120, 70, 30),
    "black": (15, 15, 15), "white": (245, 245, 245),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
DIGIT = "digit"  # the glyph class of text_change edits ("the number 7"); not a GenEval class
BACKGROUND_NAME = "grey"
BACKGROUND: tuple[int, int, int] = (150, 150, 150)  # mid-grey: none of the 10 colours
# Every colour a background may take: the default grey, or one of the 10 (background_change).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {BACKGROUND_NAME: BACKGROUND, **COLOURS}
# Outline ("hollow") style is drawn for these classes only: a cross or a star is too thin at
# 64 px to show a hole, so an edit never asks for it.
HOLLOW_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

COLOURS_CN: dict[str, str] = {
    "red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "blue": "蓝色", "purple": "紫色",
    "pink": "粉色", "brown": "棕色", "black": "黑色", "white": "白色", "grey": "灰色",
}
CLASSES_CN: dict[str, str] = {
    "circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形", "star": "星形", "cross": "十字形",
}

_M = np.array([[0.4124564, 0.3575761, 0.1804375],
               [0.2126729, 0.7151522, 0.0721750],
               [0.0193339, 0.1191920, 0.9503041]], dtype=np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8 or float 0..255, any leading shape, last axis 3) -> CIELAB (D65), float32."""
    c = np.asarray(rgb, dtype=np.float32) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = (lin @ _M.T) / _WHITE
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


PROTOTYPES_LAB: np.ndarray = rgb_to_lab(np.array(list(COLOURS.values()), dtype=np.float32))
BACKGROUNDS_LAB: np.ndarray = rgb_to_lab(np.array(list(BACKGROUNDS.values()), dtype=np.float32))


def nearest_colour(lab: np.ndarray, with_background: bool = False) -> tuple[str, float]:
    """The palette name nearest to one Lab colour (ΔE76) and that distance; ``with_background``
    also allows the default grey."""
    names = tuple(BACKGROUNDS) if with_background else COLOUR_NAMES
    table = BACKGROUNDS_LAB if with_background else PROTOTYPES_LAB
    d = np.linalg.norm(table - np.asarray(lab, dtype=np.float32)[None, :], axis=1)
    i = int(np.argmin(d))
    return names[i], float(d[i])
