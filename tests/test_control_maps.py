"""Weight-free control maps for the InstantX Union ControlNet (flux_core.control_maps) and their nodes.

Canny is checked against OpenCV's cv2.Canny without OpenCV installed: the expected edge maps below are cv2.Canny's
output (opencv-python-headless 5.0.0, pip wheel, in a throwaway environment) on inputs that these tests build with
integer arithmetic only, written here as literals. On 21 further images (a 477x720 photo, the four example-workflow
thumbnails at 432x768 and random noise, each at thresholds 100/200, 50/150, 20/40) the edges were identical pixel
for pixel (100 % agreement); these literals keep that checked.
"""
import base64
import inspect
import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core import control_maps as cm
from nodes import comfy_bridge
from nodes.control_map_nodes import (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, FluxCoreBlurMap,
                                     FluxCoreCannyMap, FluxCoreGrayMap, FluxCoreLowQualityMap, FluxCoreTileMap)
from nodes.loaders import NodeInputError


# ----------------------------------------------------------------------------- inputs made with integers only
def hash_noise(n: int, seed: int) -> np.ndarray:
    """n pseudo-random uint32 values from an integer hash of the index (same bits on every platform)."""
    v = (np.arange(n, dtype=np.uint64) + np.uint64(seed * 0x9E3779B9)) * np.uint64(2654435761) % np.uint64(1 << 32)
    v ^= v >> np.uint64(16)
    v = v * np.uint64(0x45D9F3B) % np.uint64(1 << 32)
    v ^= v >> np.uint64(16)
    return v


def scene(h: int = 64, w: int = 64) -> np.ndarray:
    """A small photo-like RGB image: colour ramps, a disk, a rectangle, a triangle, a faint step and noise of
    +-20 per channel (edges in every direction, weak and strong, channel-dependent)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.int64)
    img[..., 0] = 40 + 2 * x
    img[..., 1] = 60 + y
    img[..., 2] = 90
    img[(x - 20) ** 2 + (y - 22) ** 2 < 144] = (200, 180, 40)
    img[(x >= 34) & (x < 58) & (y >= 8) & (y < 30)] = (30, 90, 200)
    img[(y >= 36) & (y < 60) & (x >= 30) & (x - 30 <= y - 36)] = (120, 40, 120)
    img[(y >= 40) & (x < 20)] += (28, 0, 0)
    for c in range(3):
        img[..., c] += (hash_noise(h * w, c + 1).reshape(h, w) % 41).astype(np.int64) - 20
    return np.clip(img, 0, 255).astype(np.uint8)


def unpack(literal: str, shape) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(literal)), np.uint8)
    return np.unpackbits(bits)[:shape[0] * shape[1]].reshape(shape).astype(bool)


def ascii_map(text: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in text.split()], dtype=bool)


def edges_of(image) -> np.ndarray:
    """The edge mask of a canny() result (PIL), checking it is a white-on-black RGB image on the way."""
    array = np.asarray(image)
    assert image.mode == "RGB" and set(np.unique(array)) <= {0, 255}
    assert (array == array[..., :1]).all()
    return array[..., 0] == 255


# cv2.Canny(scene(), 100, 200) and cv2.Canny(scene(), 30, 90): np.packbits -> zlib -> base64.
CV2_SCENE_100_200 = (
    "eNqd0K1OBDEQB/B/u6V3YklOkQUBvWARG3JiBSGFM0gSDLKC5E7gSTDUkPAGnDzBg6xAIMAT1J0hvAXMRwOeSZPftjOZbQf4RwRl"
    "sJ5FtttdrMoxrW/V5F70aCNboyEjdlbX5CkOsw+8388fUneFsTiFWbIZvAIuuYi8gRGjGPlwqftfw18+IBUDKrGFP95eJDSozefs"
    "he9DbTq634TSQ1SPvXRwc0hHCXFQ3Mjy8KGjQqzfvlwi945GtuWsG7mGtef2wPHHmfUd29qqlmbWPKl4Ls5Fh7bYRHWz1/xWZitc"
    "lPz4QU3v6knSuqg3aHhYpKPH0SD8bZ6w5v7uFTJNDt+rRv6FH4UQMh0=")
CV2_SCENE_30_90 = (
    "eNoBAAL//Z9MoyTtmMqTRBMICCAHBAB0uAJhAjCCFRaSAAlTjXU9iXeOY/RiAQGJBJssBQAazY0Ih8nAJAAE06zEEgfhZ0QQqQpJ"
    "OB6Y40eoAAEgUAAhNCD/EiRc5CWJAYDCIiIRKaXGADBCqN0huAwMGEYBIEiDGulsRFVbQgEyiAYoI0pIySOI2iCgEiGoZAohKQCD"
    "IqBDAJGqEQgj4JFLwIiV1SJMWFhATsCVIEB3Q/1EUgAtZEAsQUbKYkWQVLCoqIGYIBZVoI6kVQAsUk40eCABBSNISIFFRlPsIKhq"
    "KFFKURErBCFNw0AAACptsWYmPhmYYkMZVAwB5mfJ5QxVGAAUQDkIJgA0gCwoiYGDl8Ct4CUBUVRoEJiBpUHlUQAgFwylEVCMYIcg"
    "6KwQkmhAhawKoU4CBEpkwuooAuHN+BRkIOQPnzwRMjElEIkghVCFmCEDvsvyUkIsBEiohgBLIoY5DD+RSjES0ywgQaSDAQJxpCMg"
    "o2A+ogjF5CuZhxiCMGkBKoRZBPSkMAk6AlAQJMqYQQILZchUmg3BHCDVaxJCVoSCgrEIs15TIEkpQBBUYCGKRwlRCAQIaNlUghVR"
    "dABDYCi59FkCgcAyUgYkVCTZEFhUAeAKJAQADEWvClImeoA0GKFgULmFf82IBwSJAAAAEAFRJsoBUJRL7auxSu1Un1gzLKaulA==")


# ----------------------------------------------------------------------------- canny
@pytest.mark.parametrize("low, high, literal, count", [(100, 200, CV2_SCENE_100_200, 392),
                                                      (30, 90, CV2_SCENE_30_90, 1416)])
def test_canny_equals_opencv_on_a_photo_like_scene(low, high, literal, count):
    # Checked mutations, each fails here: gray conversion before the gradient (instead of the strongest channel),
    # L2 instead of L1 magnitude, `>=` for `>` on the thresholds, both-strict suppression on the axis sectors,
    # zero instead of replicated borders for the Sobel pass, strong pixels only (no hysteresis), 4- instead of
    # 8-connected hysteresis, the two diagonal sectors swapped.
    expected = unpack(literal, (64, 64))
    assert expected.sum() == count
    edges = edges_of(cm.canny(Image.fromarray(scene()), low, high))
    assert (edges != expected).sum() == 0


SQUARE_EDGES = """
............
............
....####....
...#....#...
..#.....#...
..#.....#...
..#.....#...
..#.....#...
...######...
............
............
............
"""


def test_canny_of_a_filled_square_is_its_one_pixel_outline():
    # A square of 200 on black (rows and columns 3..8). The expectation is cv2.Canny's; it is also what the algorithm
    # must give by hand: a step of 200 has Sobel magnitude 800 on both pixels astride it, and of two equal maxima
    # across the edge OpenCV keeps the one whose *previous* neighbour is lower (left/top edges on the outer
    # pixel, right/bottom on the inner one), so every side is one pixel wide and the outline closes
    # 8-connected. Mutation checked: `>=` on both sides of suppression doubles the sides to two pixels.
    square = np.zeros((12, 12), np.uint8)
    square[3:9, 3:9] = 200
    edges = edges_of(cm.canny(Image.fromarray(square).convert("RGB")))
    assert (edges == ascii_map(SQUARE_EDGES)).all()
    inside, outside = np.zeros((12, 12), bool), np.ones((12, 12), bool)
    inside[4:8, 4:8] = True                              # two pixels from every side: never an edge
    outside[1:11, 1:11] = False
    assert not edges[inside].any() and not edges[outside].any()


HYSTERESIS_EDGES = """
.....#.....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
......######..............
......#....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
.....#.....#..............
"""


def test_canny_keeps_a_weak_edge_only_when_connected_to_a_strong_one():
    # Left block: value 60 on top (step magnitude 240 > high 200: strong), 30 below (120: between low 100 and
    # high); right block: 30 everywhere, a weak edge touching no strong one. cv2.Canny's result, above: the weak
    # lower half of the left block is kept through its link to the strong half, the right block vanishes.
    # Mutations checked: no hysteresis (every pixel > low) draws the right block; strong pixels only drop rows
    # 8..15 of the left block.
    image = np.zeros((16, 26), np.uint8)
    image[0:8, 6:12] = 60
    image[8:16, 6:12] = 30
    image[:, 19:25] = 30
    edges = edges_of(cm.canny(Image.fromarray(image)))
    assert (edges == ascii_map(HYSTERESIS_EDGES)).all()
    assert not edges[:, 14:].any()


def test_canny_finds_an_edge_between_colours_of_equal_luma():
    # Pure red (luma 76) next to green 130 (luma 76): gray first (as some annotators do) finds no edge here;
    # cv2.Canny on the colour image, which controlnet_aux runs, finds one column, and so must we.
    # Mutation checked: converting to "L" before the gradient gives no edges.
    image = np.zeros((8, 12, 3), np.uint8)
    image[:, :6] = (255, 0, 0)
    image[:, 6:] = (0, 130, 0)
    assert np.asarray(Image.fromarray(image).convert("L")).std() == 0
    edges = edges_of(cm.canny(Image.fromarray(image)))
    assert edges[:, 5].all() and edges.sum() == 8


def test_canny_thresholds_sigma_and_the_batch_path():
    photo = Image.fromarray(scene())
    counts = [edges_of(cm.canny(photo, low, high)).sum() for low, high in [(30, 90), (100, 200), (200, 400)]]
    assert edges_of(cm.canny(photo, np.int64(30), np.float32(90.0))).sum() == counts[0]   # numpy scalars
    assert counts[0] > counts[1] > counts[2] > 0
    # sigma blurs first (noise edges disappear); 0 is no blur. Mutation checked: ignoring sigma.
    assert edges_of(cm.canny(photo, 30, 90, sigma=2.0)).sum() < counts[0] / 2
    # The IMAGE path equals the PIL path image by image (two different images, so a batch mapped with the first
    # image's map, or with the images swapped, fails) and returns (B, H, W, 3) floats in {0, 1}.
    second = np.ascontiguousarray(scene()[::-1, ::-1])
    batch = torch.from_numpy(np.stack([scene(), second])).float() / 255
    out = cm.canny(batch)
    assert out.shape == (2, 64, 64, 3) and out.dtype == torch.float32
    for i, array in enumerate([scene(), second]):
        assert torch.equal(out[i, ..., 0] == 1, torch.from_numpy(edges_of(cm.canny(Image.fromarray(array)))))
    # A single (H, W, 3) image keeps its rank.
    assert torch.equal(cm.canny(batch[0]), out[0])


@pytest.mark.parametrize("kwargs, parameter, words", [
    ({"low_threshold": 150, "high_threshold": 100}, "low_threshold", "must not exceed high_threshold"),
    ({"low_threshold": -1}, "low_threshold", ">= 0"),
    ({"high_threshold": float("nan")}, "high_threshold", "must be a number"),
    ({"high_threshold": "200"}, "high_threshold", "must be a number"),
    ({"sigma": -0.5}, "sigma", ">= 0"),
    ({"sigma": True}, "sigma", "must be a number"),
])
def test_canny_rejects_bad_parameters_by_name(kwargs, parameter, words):
    with pytest.raises(cm.ControlMapInputError, match=words) as error:
        cm.canny(Image.new("RGB", (8, 8)), **kwargs)
    assert error.value.parameter == parameter and parameter in str(error.value)


@pytest.mark.parametrize("image, words", [
    (np.zeros((8, 8, 3), np.uint8), "must be a PIL.Image.Image or an IMAGE tensor"),
    (torch.zeros(1, 8, 8, 2), "C = 1, 3 or 4"),
    (torch.zeros(8, 8), "C = 1, 3 or 4"),
    (torch.zeros(0, 8, 8, 3), "empty image batch"),
    (torch.zeros(1, 8, 8, 3, dtype=torch.uint8), "divide 8-bit values by 255"),
])
def test_every_map_rejects_what_is_not_an_image(image, words):
    for make in cm.CONTROL_MAPS.values():
        with pytest.raises(cm.ControlMapInputError, match=words):
            make(image)


def test_tensor_values_round_to_the_nearest_8_bit_level():
    # Every 8-bit level k, as k/255 with a float error just below it, comes back as k (a gray image's luma is
    # itself). Mutation checked: `.to(torch.uint8)` without `.round()` turns every k >= 1 into k - 1.
    levels = torch.arange(256, dtype=torch.float64).div(255).mul(1 - 1e-7).float()
    image = levels.reshape(1, 16, 16, 1).expand(-1, -1, -1, 3)
    assert torch.equal(cm.gray(image) * 255, torch.arange(256.0).reshape(1, 16, 16, 1).expand(-1, -1, -1, 3))


def test_grayscale_and_alpha_tensors_are_read_as_rgb():
    rgb = torch.from_numpy(scene()).float() / 255
    rgba = torch.cat([rgb, torch.full((64, 64, 1), 0.5)], dim=-1)[None]
    assert torch.equal(cm.gray(rgba), cm.gray(rgb[None]))
    one_channel = rgb[None, ..., :1]
    assert torch.equal(cm.gray(one_channel), one_channel.expand(-1, -1, -1, 3))


# ----------------------------------------------------------------------------- blur, gray, tile, lq
def spread(image: Image.Image) -> float:
    """Variance (px^2) along x of a blurred centred impulse."""
    row = np.asarray(image, dtype=np.float64)[..., 0].sum(axis=0)
    x = np.arange(row.size)
    mean = (row * x).sum() / row.sum()
    return float((row * (x - mean) ** 2).sum() / row.sum())


@pytest.mark.parametrize("sigma", [2.0, 6.0])
def test_blur_is_a_gaussian_of_standard_deviation_sigma(sigma):
    # A white block blurred gains variance sigma^2 (what the "blur" union mode's strength means). PIL approximates the
    # Gaussian with box filters and rounds to 8 bits: measured 3.99 for sigma 2 (4) and 35.26 for sigma 6 (36);
    # 10 % catches sigma passed as a radius of 2 sigma (measured 15.8 and 141.8) or as a variance.
    bright = Image.new("RGB", (129, 129))
    bright.paste((255, 255, 255), (60, 60, 69, 69))           # a 9x9 block: enough mass to survive 8-bit rounding
    measured = spread(cm.blur(bright, sigma)) - spread(bright)
    assert measured == pytest.approx(sigma ** 2, rel=0.1)
    out = cm.blur(torch.from_numpy(np.array(bright)).float()[None] / 255, sigma)
    assert torch.equal(out[0], torch.from_numpy(np.array(cm.blur(bright, sigma))).float() / 255)
    with pytest.raises(cm.ControlMapInputError, match="sigma must be > 0"):
        cm.blur(bright, 0)


def test_gray_is_bt601_luma_on_three_channels():
    # Literal BT.601 weights: (255, 0, 0) -> 76, (0, 255, 0) -> 150, (0, 0, 255) -> 29, (10, 200, 90) -> 130.
    # Mutation checked: the channel mean (85 for pure red) fails.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 200, 90)]
    image = Image.new("RGB", (4, 1))
    for i, colour in enumerate(colours):
        image.putpixel((i, 0), colour)
    out = np.asarray(cm.gray(image))
    for i, (r, g, b) in enumerate(colours):
        assert abs(int(out[0, i, 0]) - (0.299 * r + 0.587 * g + 0.114 * b)) <= 0.5
    assert (out == out[..., :1]).all() and cm.gray(image).mode == "RGB"


def checkerboard_on_ramp(size: int = 64) -> Image.Image:
    """Fine detail (a 1-px checkerboard of +-40) over coarse content (a horizontal ramp 40..229)."""
    y, x = np.mgrid[0:size, 0:size]
    ramp = 40 + x * 3
    return Image.fromarray(np.repeat((ramp + np.where((x + y) % 2, 40, -40))[..., None], 3, 2).astype(np.uint8))


def test_tile_removes_detail_and_keeps_layout():
    photo = checkerboard_on_ramp()
    out = cm.tile(photo, 4)
    assert out.size == photo.size and out.mode == "RGB"
    source, result = np.asarray(photo, float)[..., 0], np.asarray(out, float)[..., 0]
    ramp = 40 + np.arange(64) * 3.0
    # Detail: the checkerboard's +-40 is gone (measured residual std 1.35 inside, away from the ramp's ends);
    # layout: the ramp survives (measured mean error 1.26 over columns 8..55). Mutation checked: factor ignored
    # (no downscale) leaves the +-40 checkerboard, std 40.
    inner = slice(8, 56)
    assert (result - ramp)[:, inner].std() < 3
    assert np.abs(result[:, inner].mean(axis=0) - ramp[inner]).mean() < 3
    assert (source - ramp)[:, inner].std() > 39
    # factor 1 is the image as it is (DiffSynth's tile annotator).
    assert np.array_equal(np.asarray(cm.tile(photo, 1)), np.asarray(photo))
    with pytest.raises(cm.ControlMapInputError, match="factor must be >= 1"):
        cm.tile(photo, 0.5)


def jpeg_roundtrip(image: Image.Image, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_low_quality_is_downscale_jpeg_upscale():
    photo = Image.fromarray(scene())
    # factor 1: exactly PIL's JPEG round trip at that quality. Mutation checked: quality not passed to save()
    # (PIL's default 75) fails.
    assert np.array_equal(np.asarray(cm.low_quality(photo, 1, 20)), jpeg_roundtrip(photo, 20))
    # factor 2: the half-size image compressed, then upscaled back to the photo's size.
    half = photo.resize((32, 32), Image.BICUBIC)
    expected = Image.fromarray(jpeg_roundtrip(half, 30)).resize((64, 64), Image.BICUBIC)
    out = cm.low_quality(photo)
    assert out.size == (64, 64) and np.array_equal(np.asarray(out), np.asarray(expected))
    # Lower quality, larger error (measured mean abs error 20.2 at q=5, 9.9 at q=90: the +-20 noise is costly).
    error = {q: np.abs(np.asarray(cm.low_quality(photo, 1, q), float) - scene()).mean() for q in (5, 90)}
    assert error[5] > 1.5 * error[90]
    for kwargs, parameter in [({"jpeg_quality": 0}, "jpeg_quality"), ({"jpeg_quality": 96}, "jpeg_quality"),
                              ({"jpeg_quality": 30.5}, "jpeg_quality"), ({"factor": 0}, "factor")]:
        with pytest.raises(cm.ControlMapInputError) as error_info:
            cm.low_quality(photo, **kwargs)
        assert error_info.value.parameter == parameter


def test_registry_matches_the_union_modes():
    # The InstantX model card's ids, literally; every weight-free mode has a map, depth and pose say what to give.
    assert cm.UNION_MODES == {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
    assert set(cm.CONTROL_MAPS) == set(cm.UNION_MODES) - {"depth", "pose"}
    photo = Image.fromarray(scene())
    expected = np.asarray(cm.low_quality(photo, jpeg_quality=50))
    for mode in ("lq", 6, "low quality"):      # as processor_id takes it: name, id or alias
        assert np.array_equal(np.asarray(cm.control_map(mode, photo, jpeg_quality=50)), expected)
    assert np.array_equal(np.asarray(cm.control_map(5, photo)), np.asarray(cm.gray(photo)))
    with pytest.raises(cm.ControlMapInputError, match="depth map .* processor_id='depth'"):
        cm.control_map("depth", photo)
    with pytest.raises(cm.ControlMapInputError, match="OpenPose"):
        cm.control_map(4, photo)
    for mode in ("normal", 7):
        with pytest.raises(cm.ControlMapInputError, match="not a union ControlNet mode") as error:
            cm.control_map(mode, photo)
        assert error.value.parameter == "mode"


# ----------------------------------------------------------------------------- nodes
NODES = [(FluxCoreCannyMap, cm.canny, {"low_threshold": 30, "high_threshold": 90, "sigma": 0.0}),
         (FluxCoreTileMap, cm.tile, {"factor": 3.0}),
         (FluxCoreBlurMap, cm.blur, {"sigma": 2.5}),
         (FluxCoreGrayMap, cm.gray, {}),
         (FluxCoreLowQualityMap, cm.low_quality, {"factor": 1.5, "jpeg_quality": 40})]


def test_node_mappings_and_inputs():
    assert set(NODE_CLASS_MAPPINGS) == {"FluxCoreCannyMap", "FluxCoreTileMap", "FluxCoreBlurMap", "FluxCoreGrayMap",
                                        "FluxCoreLowQualityMap"} == set(NODE_DISPLAY_NAME_MAPPINGS)
    for node, make, params in NODES:
        inputs = node.INPUT_TYPES()["required"]
        assert node.CATEGORY == "FluxCore/controlnet" and node.RETURN_TYPES == ("IMAGE",)
        assert set(inputs) == {"image", *params}
        assert all(spec[1].get("tooltip") for spec in inputs.values())
        engine = inspect.signature(make).parameters
        method = inspect.signature(getattr(node, node.FUNCTION)).parameters
        for name in params:                   # widget, method and engine defaults agree
            assert inputs[name][1]["default"] == method[name].default == engine[name].default


@pytest.mark.parametrize("node, make, params", NODES)
def test_nodes_map_a_batch_image_by_image(node, make, params):
    # Two different images: each output equals the engine's map of that image with the node's parameters.
    # Mutation checked: a parameter not forwarded (engine default used) fails for every node with parameters.
    batch = torch.from_numpy(np.stack([scene(), np.ascontiguousarray(scene()[::-1])])).float() / 255
    (out,) = getattr(node(), node.FUNCTION)(batch, **params)
    assert out.shape == (2, 64, 64, 3)
    for i in range(2):
        assert torch.equal(out[i], make(batch[i], **params))
    if params:
        defaults = getattr(node(), node.FUNCTION)(batch)[0]
        assert not torch.equal(defaults, out)


@pytest.mark.parametrize("node, kwargs, input_name", [
    (FluxCoreCannyMap, {"low_threshold": 300, "high_threshold": 200}, "low_threshold"),
    (FluxCoreBlurMap, {"sigma": 0.0}, "sigma"),
    (FluxCoreTileMap, {"factor": 0.5}, "factor"),
    (FluxCoreLowQualityMap, {"jpeg_quality": 0}, "jpeg_quality"),
])
def test_node_errors_name_the_node_and_the_input(node, kwargs, input_name):
    with pytest.raises(NodeInputError, match=rf"^{node.__name__}, input '{input_name}': "):
        getattr(node(), node.FUNCTION)(torch.zeros(1, 8, 8, 3), **kwargs)


@pytest.mark.parametrize("image", [torch.zeros(8, 8, 3), torch.zeros(0, 8, 8, 3), "photo.png"])
def test_node_refuses_what_is_not_an_image_batch(image):
    with pytest.raises(NodeInputError, match=r"^FluxCoreGrayMap, input 'image': expected an IMAGE batch"):
        FluxCoreGrayMap().make(image)


def test_node_stops_between_images_on_interrupt():
    comfy_bridge.request_interrupt()
    with pytest.raises(comfy_bridge.Interrupted):
        FluxCoreGrayMap().make(torch.zeros(2, 8, 8, 3))
