"""Draws the two input images of the EliGen example workflow (committed beside this script):

    python example_workflows/make_eligen_masks.py      # needs only Pillow

Each is a 256x256 sketch of the picture's layout (a wall, a table top) with one region left transparent: LoadImage's
MASK output is 1 where an image is transparent, so the transparent region is the entity's region, exactly as if it
had been painted in ComfyUI's MaskEditor (right-click the image, "Open in MaskEditor": paint over the region to
change it). `fluxcore_eligen_left.png` holds the left entity's region, `fluxcore_eligen_right.png` the right one's.

The regions' edges lie on multiples of 16 pixels: at the workflow's 768x768 (a factor of 3) they fall on multiples
of 48 pixels, 6 latent pixels, whole 2x2 patches of the latent (at 1024x1024 likewise, 64 pixels), so the masks stay
sharp on the tokens FLUX packs.
Like fluxcore_example.png, copy them into ComfyUI's `input/` folder (README, "Example workflows").
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 256
REGIONS = {  # file -> (left, top, right, bottom) of its transparent region
    "fluxcore_eligen_left.png": (16, 64, 128, 224),
    "fluxcore_eligen_right.png": (144, 32, 240, 224),
}


def draw(region: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGBA", (SIZE, SIZE), (214, 206, 192, 255))                      # wall
    pen = ImageDraw.Draw(image)
    pen.rectangle((0, 176, SIZE, SIZE), fill=(150, 110, 80, 255))                       # table top
    pen.line([(0, 176), (SIZE, 176)], fill=(110, 80, 60, 255), width=3)
    left, top, right, bottom = region
    pen.rectangle((left, top, right - 1, bottom - 1), fill=(255, 255, 255, 0))          # the entity's region
    return image


def main() -> None:
    for name, region in REGIONS.items():
        path = HERE / name
        draw(region).save(path, optimize=True)
        print("wrote", path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
