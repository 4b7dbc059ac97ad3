"""Draws the input images of the IP-Adapter and InfiniteYou example workflows (committed beside this script):

    python example_workflows/make_adapter_images.py      # needs only Pillow

- `fluxcore_reference.png`: the IP-Adapter's reference image, a 256x256 night scene in bold, swirling strokes (a
  style and a palette for the adapter to carry over);
- `fluxcore_face.png`: a 256x256 drawn portrait that stands in the InfiniteYou example's face input. InfiniteYou
  needs a photo of a real person's face (insightface detects the face in it); replace this drawing with one, in
  ComfyUI's LoadImage, before running the workflow: a drawing may not be found as a face.

Like fluxcore_example.png, copy them into ComfyUI's `input/` folder (README, "Example workflows").
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
REFERENCE, FACE = "fluxcore_reference.png", "fluxcore_face.png"
SIZE = 256


def draw_reference() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (20, 30, 80))
    pen = ImageDraw.Draw(image)
    for row in range(0, 170, 10):  # swirling sky strokes, deep blue to turquoise
        for col in range(-20, SIZE + 20, 18):
            phase = math.sin(col / 23 + row / 17)
            x, y = col + 8 * phase, row + 6 * math.cos(col / 31 + row / 11)
            shade = (40 + row // 3, 70 + row // 2, 150 + int(60 * (phase + 1) / 2))
            pen.arc((x - 14, y - 8, x + 14, y + 8), 200, 340, fill=shade, width=4)
    for cx, cy, r in ((60, 50, 10), (150, 35, 7), (205, 70, 9), (110, 95, 6)):  # stars with halos
        for k in range(3, 0, -1):
            pen.ellipse((cx - r * k, cy - r * k, cx + r * k, cy + r * k), outline=(240, 220, 120), width=2)
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 236, 140))
    pen.ellipse((190, 10, 240, 60), fill=(250, 210, 90))                                   # moon
    pen.polygon([(0, 200), (60, 160), (120, 190), (180, 150), (256, 185), (256, 256), (0, 256)],
                fill=(30, 60, 50))                                                         # hills
    pen.polygon([(30, 256), (42, 120), (54, 256)], fill=(15, 30, 20))                      # a cypress
    for i in range(6):                                                                     # village lights
        pen.rectangle((110 + 22 * i, 214 - 4 * (i % 3), 124 + 22 * i, 230), fill=(60, 70, 90))
        pen.rectangle((114 + 22 * i, 219, 118 + 22 * i, 223), fill=(250, 220, 100))
    return image


def draw_face() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (200, 215, 230))
    pen = ImageDraw.Draw(image)
    pen.ellipse((58, 28, 198, 150), fill=(70, 45, 30))                                     # hair
    pen.rectangle((70, 200, 186, 256), fill=(60, 90, 140))                                 # shoulders
    pen.ellipse((40, 210, 216, 300), fill=(60, 90, 140))
    pen.rectangle((110, 170, 146, 215), fill=(225, 180, 150))                              # neck
    pen.ellipse((72, 52, 184, 196), fill=(235, 190, 160))                                  # face
    for x in (96, 140):                                                                    # eyes
        pen.ellipse((x, 104, x + 22, 116), fill=(250, 250, 250))
        pen.ellipse((x + 7, 105, x + 16, 115), fill=(60, 40, 30))
        pen.line((x - 2, 96, x + 24, 94), fill=(70, 45, 30), width=3)                     # brows
    pen.line((128, 116, 122, 144), fill=(190, 140, 115), width=3)                          # nose
    pen.line((122, 144, 132, 145), fill=(190, 140, 115), width=3)
    pen.arc((108, 148, 148, 172), 20, 160, fill=(170, 80, 80), width=4)                    # mouth
    pen.ellipse((66, 112, 80, 138), fill=(225, 180, 150))                                  # ears
    pen.ellipse((176, 112, 190, 138), fill=(225, 180, 150))
    return image


IMAGES = {REFERENCE: draw_reference, FACE: draw_face}


def main() -> None:
    for name, draw in IMAGES.items():
        path = HERE / name
        draw().save(path, optimize=True)
        print("wrote", path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
