"""Draws each example workflow's node graph as a simple diagram and saves it as the same-name .jpg thumbnail
that ComfyUI's template browser shows. It is a picture of the graph, not of a generated image.

    python example_workflows/make_thumbnails.py        # needs only Pillow

Nodes are laid out in columns by their distance from the loaders (links run left to right), FluxCore nodes in
blue, ComfyUI core nodes in grey; notes and reroutes are left out (a reroute's link is drawn straight through).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
SIZE = (768, 432)
BACKGROUND, TEXT, MUTED = (32, 33, 36), (235, 235, 235), (150, 150, 150)
OURS, CORE = (38, 84, 140), (74, 74, 80)
LINK_COLOURS = {"IMAGE": (100, 181, 246), "MASK": (129, 199, 132), "LATENT": (255, 156, 249),  # ComfyUI's
                "CONDITIONING": (255, 169, 49), "FLUXCORE_DIT": (179, 157, 219),               # link colours
                "FLUXCORE_TEXT_ENCODERS": (255, 213, 0), "FLUXCORE_VAE": (255, 110, 110),
                "FLUXCORE_CONTROLNET": (0, 214, 122), "VAE": (255, 110, 110), "MODEL": (179, 157, 219)}
LABELS = {"FluxCoreDiTLoader": "Load DiT", "FluxCoreTextEncoderLoader": "Load Text Encoders",
          "FluxCoreVAELoader": "Load VAE", "FluxCoreDiffusersLoader": "Load Diffusers Folder",
          "FluxCoreTextEncode": "Text Encode", "FluxCoreKontextReference": "Kontext Reference",
          "FluxCoreSampler": "Sampler", "FluxCoreEmptyLatent": "Empty Latent", "FluxCoreVAEDecode": "VAE Decode",
          "FluxCoreVAEEncode": "VAE Encode", "FluxCoreControlNetLoader": "Load ControlNet",
          "FluxCoreApplyControlNet": "Apply ControlNet", "FluxCoreCannyMap": "Canny Map",
          "FluxCoreIPAdapterLoader": "Load IP-Adapter", "FluxCoreApplyIPAdapter": "Apply IP-Adapter",
          "FluxCoreInfiniteYouLoader": "Load InfiniteYou", "FluxCoreApplyInfiniteYou": "Apply InfiniteYou",
          "FluxCoreLoadFaceEmbedding": "Load Face Embedding", "FluxCoreEliGenEntity": "EliGen Entity",
          "FluxCoreFlexInputs": "FLEX.2 Inputs", "FluxCoreQwenVLLoader": "Load Qwen2.5-VL",
          "FluxCoreStep1XConnectorLoader": "Load Step1X Connector", "FluxCoreStep1XEncode": "Step1X-Edit Encode",
          "InpaintModelConditioning": "Inpaint Model Conditioning", "FluxCoreNexusGenLoader": "Load Nexus-Gen",
          "FluxCoreNexusGenAdapterLoader": "Load Nexus-Gen Adapter", "FluxCoreNexusGenEncode": "Nexus-Gen Encode",
          "FluxCoreTrainLoRA": "Train LoRA", "FluxCoreLoraLoader": "Load LoRA"}
TITLES = {"fluxcore_text_to_image": "Text to image", "fluxcore_image_to_image": "Image to image",
          "fluxcore_kontext_edit": "Kontext edit", "fluxcore_mixed_native": "Kontext inpaint with core nodes",
          "fluxcore_controlnet_inpainting": "ControlNet inpainting (alimama)",
          "fluxcore_controlnet_union_canny": "Union ControlNet, canny (InstantX)",
          "fluxcore_controlnet_upscale": "2x upscale, upscaler ControlNet + tiled DiT",
          "fluxcore_ipadapter_instantx": "IP-Adapter, reference image (InstantX)",
          "fluxcore_infiniteyou": "InfiniteYou, identity from a face photo",
          "fluxcore_eligen": "EliGen, one prompt per painted region",
          "fluxcore_flux_fill": "FLUX.1-Fill inpainting, native InpaintModelConditioning",
          "fluxcore_flex2": "FLEX.2-preview: inpainting + canny control",
          "fluxcore_step1x_edit": "Step1X-Edit: edit by instruction (Qwen2.5-VL)",
          "fluxcore_nexus_gen": "Nexus-Gen: text to image through Qwen2.5-VL",
          "fluxcore_demo_text_to_image": "Demo model: text to image, nothing to download",
          "fluxcore_demo_lora": "Demo model: train a LoRA, then use it"}
SKIP = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def label(node_type: str) -> str:
    if node_type in LABELS:
        return LABELS[node_type]
    name = node_type.removeprefix("FluxCore")
    return " ".join(re.findall(r"[A-Z]+(?=[A-Z][a-z]|\d|$)|[A-Z]?[a-z]+|\d+", name)) or name


def edges(workflow: dict) -> list[tuple[int, int, str]]:
    """(from, to, type) between drawn nodes, following reroutes."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    by_target = {(l[3], l[4]): l for l in workflow["links"]}
    out = []
    for link in workflow["links"]:
        _, src, slot, dst, _, kind = link[:6]
        if nodes[dst]["type"] in SKIP:
            continue
        while nodes[src]["type"] == "Reroute" and (src, 0) in by_target:
            src, kind = by_target[(src, 0)][1], kind
        if nodes[src]["type"] not in SKIP:
            out.append((src, dst, kind))
    return out


def layout(workflow: dict, links) -> dict[int, int]:
    """Column of each drawn node: after everything it takes inputs from; a node without inputs (a loader) sits
    just left of the first node it feeds, so links stay short."""
    ids = [n["id"] for n in workflow["nodes"] if n["type"] not in SKIP]
    column = {i: 0 for i in ids}
    for _ in ids:
        for src, dst, _ in links:
            column[dst] = max(column[dst], column[src] + 1)
    has_input = {dst for _, dst, _ in links}
    for nid in ids:
        targets = [column[dst] for src, dst, _ in links if src == nid]
        if nid not in has_input and targets:
            column[nid] = min(targets) - 1
    return column


def rows_in_columns(column: dict[int, int], links, nodes) -> dict[int, list[int]]:
    """Nodes of each column, top to bottom, ordered by where their inputs sit (fewer crossing links)."""
    rows: dict[int, list[int]] = {}
    for nid in sorted(column, key=lambda i: (column[i], nodes[i]["pos"][1], i)):
        rows.setdefault(column[nid], []).append(nid)
    for _ in range(3):
        place = {nid: r / max(1, len(m) - 1) for m in rows.values() for r, nid in enumerate(m)}
        for c, members in rows.items():
            def weight(nid):
                near = [place[s] for s, d, _ in links if d == nid] + [place[d] for s, d, _ in links if s == nid]
                return sum(near) / len(near) if near else place[nid]
            members.sort(key=weight)
    return rows


def curve(a, b, steps: int = 24) -> list[tuple[float, float]]:
    """A horizontal S-curve from a to b, like the links on ComfyUI's canvas."""
    dx = max(30.0, abs(b[0] - a[0]) / 2)
    p0, p1, p2, p3 = a, (a[0] + dx, a[1]), (b[0] - dx, b[1]), b
    points = []
    for i in range(steps + 1):
        t = i / steps
        u = 1 - t
        points.append((u ** 3 * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t ** 3 * p3[0],
                       u ** 3 * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t ** 3 * p3[1]))
    return points


def draw(workflow: dict, title: str) -> Image.Image:
    image = Image.new("RGB", SIZE, BACKGROUND)
    d = ImageDraw.Draw(image)
    links = edges(workflow)
    column = layout(workflow, links)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    columns = max(column.values()) + 1
    rows = rows_in_columns(column, links, nodes)
    top, margin = 70, 16
    col_w = (SIZE[0] - 2 * margin) / columns
    box_w, box_h = min(150, col_w - 18), 42
    centre = {}
    for c, members in rows.items():
        gap = (SIZE[1] - top - margin) / len(members)
        for r, nid in enumerate(members):
            x = margin + c * col_w + (col_w - box_w) / 2
            y = top + r * gap + (gap - box_h) / 2
            centre[nid] = (x, y)
    for src, dst, kind in links:
        (x0, y0), (x1, y1) = centre[src], centre[dst]
        a, b = (x0 + box_w, y0 + box_h / 2), (x1, y1 + box_h / 2)
        d.line(curve(a, b), fill=LINK_COLOURS.get(kind, MUTED), width=2)
    small, big = font(13), font(22)
    for nid, (x, y) in centre.items():
        kind = nodes[nid]["type"]
        d.rounded_rectangle([x, y, x + box_w, y + box_h], radius=7, fill=OURS if kind.startswith("FluxCore") else CORE,
                            outline=(20, 20, 20))
        words, lines = label(kind).split(), [""]
        for word in words:  # wrap to the box
            trial = (lines[-1] + " " + word).strip()
            if d.textlength(trial, font=small) <= box_w - 10 or not lines[-1]:
                lines[-1] = trial
            else:
                lines.append(word)
        lines = lines[:2]
        for i, line in enumerate(lines):
            ty = y + box_h / 2 + (i - len(lines) / 2) * 15 + 1
            d.text((x + box_w / 2, ty + 7), line, font=small, fill=TEXT, anchor="mm")
    d.text((margin, 22), title, font=big, fill=TEXT, anchor="lm")
    d.text((margin, 48), "FluxCore nodes (blue) with ComfyUI core nodes (grey)", font=small, fill=MUTED, anchor="lm")
    return image


def main() -> None:
    for path in sorted(HERE.glob("*.json")):
        workflow = json.loads(path.read_text(encoding="utf-8"))
        title = TITLES.get(path.stem) or path.stem.removeprefix("fluxcore_").replace("_", " ").capitalize()
        draw(workflow, f"FluxCore: {title}").save(path.with_suffix(".jpg"), quality=88)
        print("wrote", path.with_suffix(".jpg").name)


if __name__ == "__main__":
    main()
