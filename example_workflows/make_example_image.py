"""Draws the input image the example workflows load, `fluxcore_example.png` (committed beside this script).

    python example_workflows/make_example_image.py      # needs only Pillow

ComfyUI's LoadImage reads from ComfyUI's `input/` folder, and ComfyUI has no way for a node pack to put files
there (a pack's example_workflows/ folder is only served, at /api/workflow_templates/<pack>/<file>): copy this
image into `ComfyUI/input/` before running the image-to-image, Kontext and inpainting examples (README).

A 384x384 landscape (sky, sun, hills, a house, a table in front) with a transparent rectangle on the table: the
mask LoadImage gives (1 where transparent) marks the area the inpainting example regenerates, as if painted in
the MaskEditor. The rectangle's edges lie on multiples of 48 pixels, so its mask stays sharp (0 or 1) when it is
resized to the latent of the 1024x1024 image (a factor of 3 at 384 pixels: every latent pixel samples one image
pixel) and on the 2x2 patches FLUX packs.

`fluxcore_inpaint.png`: the same scene at 512x512 (Lanczos) with the hole scaled to (128, 256, 384, 448), for the
FLUX.1-Fill and FLEX.2 examples, which take the image and its mask at the output's size (512x512): native
InpaintModelConditioning resizes the mask to the image bilinearly, which would blur the 384-pixel mask's edges at 512,
and FLUX.1-Fill reads that mask as it is. Edges on multiples of 64 pixels keep it 0 or 1 on the latent (8 pixels)
and on the packed 2x2 patches.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
NAME = "fluxcore_example.png"
SIZE = 384
HOLE = (96, 192, 288, 336)  # left, top, right, bottom of the transparent (to inpaint) area
INPAINT_NAME, INPAINT_SIZE = "fluxcore_inpaint.png", 512
INPAINT_HOLE = tuple(v * INPAINT_SIZE // SIZE for v in HOLE)  # (128, 256, 384, 448)


def draw() -> Image.Image:
    image = Image.new("RGBA", (SIZE, SIZE))
    pen = ImageDraw.Draw(image)
    for y in range(SIZE // 2):  # sky: deep blue at the top to pale blue at the horizon
        t = y / (SIZE // 2)
        pen.line([(0, y), (SIZE, y)], fill=(int(40 + 140 * t), int(90 + 120 * t), int(200 + 50 * t), 255))
    pen.ellipse((272, 32, 336, 96), fill=(255, 214, 90, 255))                        # sun
    pen.ellipse((-120, 150, 220, 330), fill=(74, 140, 70, 255))                      # hills
    pen.ellipse((150, 160, 520, 340), fill=(56, 120, 60, 255))
    pen.rectangle((40, 168, 112, 224), fill=(220, 200, 170, 255))                     # house
    pen.polygon([(32, 168), (76, 136), (120, 168)], fill=(170, 60, 50, 255))
    pen.rectangle((68, 196, 84, 224), fill=(110, 70, 40, 255))
    pen.rectangle((0, 240, SIZE, SIZE), fill=(150, 105, 70, 255))                     # table
    for x in range(0, SIZE, 24):                                                      # wood grain
        pen.line([(x, 240), (x + 12, SIZE)], fill=(135, 92, 60, 255), width=2)
    pen.rectangle((HOLE[0], HOLE[1], HOLE[2] - 1, HOLE[3] - 1), fill=(200, 200, 200, 0))  # to inpaint
    return image


def draw_inpaint() -> Image.Image:
    """The scene at INPAINT_SIZE, transparent (alpha 0) exactly inside INPAINT_HOLE."""
    image = draw().convert("RGB").resize((INPAINT_SIZE, INPAINT_SIZE), Image.LANCZOS).convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    left, top, right, bottom = INPAINT_HOLE
    ImageDraw.Draw(alpha).rectangle((left, top, right - 1, bottom - 1), fill=0)
    image.putalpha(alpha)
    return image


def main() -> None:
    for name, picture in ((NAME, draw), (INPAINT_NAME, draw_inpaint)):
        path = HERE / name
        picture().save(path, optimize=True)
        print("wrote", path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
