"""Writes the example workflows in this folder, in the UI (graph) format that ComfyUI saves and loads.

    python example_workflows/build_workflows.py      # from the repository root; then make_thumbnails.py

Sockets and outputs come from the node classes themselves (FluxCore's, and core_nodes.py's declarations of the
few ComfyUI core nodes used), so a renamed input shows up here; widget values are written in widget order, each
seed followed by its control_after_generate value, exactly as the ComfyUI frontend saves them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from example_workflows.core_nodes import core_nodes, native_sampling_nodes  # noqa: E402
from example_workflows.make_adapter_images import FACE as FACE_IMAGE, REFERENCE as REFERENCE_IMAGE  # noqa: E402
from example_workflows.make_eligen_masks import REGIONS as ELIGEN_REGIONS  # noqa: E402
from example_workflows.make_example_image import INPAINT_NAME as INPAINT_IMAGE, NAME as EXAMPLE_IMAGE  # noqa: E402
from example_workflows.ui_format import is_widget, saved_value_count  # noqa: E402
from flux_core import demo  # noqa: E402
from flux_core.demo.scenes import COLOURS, POSITION_WORDS, SHAPES, Scene  # noqa: E402
from nodes import NODE_CLASS_MAPPINGS  # noqa: E402

MODEL_URLS = {  # shown by ComfyUI's "missing models" dialog (node property "models")
    "flux1-dev.safetensors": "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
    "flux1-kontext-dev.safetensors":
        "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/resolve/main/flux1-kontext-dev.safetensors",
    "clip_l.safetensors": "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    "t5xxl_fp16.safetensors":
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
    "ae.safetensors": "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors",
    "ip-adapter.bin": "https://huggingface.co/InstantX/FLUX.1-dev-IP-Adapter/resolve/main/ip-adapter.bin",
    "flux1-fill-dev.safetensors":
        "https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev/resolve/main/flux1-fill-dev.safetensors",
    "Flex.2-preview.safetensors":
        "https://huggingface.co/ostris/Flex.2-preview/resolve/main/Flex.2-preview.safetensors",
    "step1x-edit-i1258.safetensors":
        "https://huggingface.co/stepfun-ai/Step1X-Edit/resolve/main/step1x-edit-i1258.safetensors",
    "Hyper-FLUX.1-dev-8steps-lora.safetensors":
        "https://huggingface.co/ByteDance/Hyper-SD/resolve/main/Hyper-FLUX.1-dev-8steps-lora.safetensors",
}
# The native-sampler example's LoRA (ByteDance's 8-step LoRA for FLUX.1-dev; its published strength 0.125).
NATIVE_LORA = "Hyper-FLUX.1-dev-8steps-lora.safetensors"
# The published ControlNets, as models/controlnet/<repository folder>/<file> (a folder each: they share a file name).
# Not in MODEL_URLS: the frontend's missing-models dialog saves a download under its bare name, not in a folder.
CONTROLNET_FILES = {
    "inpainting": "FLUX.1-dev-Controlnet-Inpainting-Beta/diffusion_pytorch_model.safetensors",
    "union": "FLUX.1-dev-Controlnet-Union-alpha/diffusion_pytorch_model.safetensors",
    "upscaler": "Flux.1-dev-Controlnet-Upscaler/diffusion_pytorch_model.safetensors",
}
CONTROLNET_REPOS = {"inpainting": "alimama-creative/FLUX.1-dev-Controlnet-Inpainting-Beta",
                    "union": "InstantX/FLUX.1-dev-Controlnet-Union-alpha",
                    "upscaler": "jasperai/Flux.1-dev-Controlnet-Upscaler"}

# The IP-Adapter example's files: InstantX's adapter in models/ipadapter, and its SigLIP encoder as the
# google/siglip-so400m-patch14-384 folder (config.json + model.safetensors) in models/clip_vision.
IPADAPTER_FILES = {"ipadapter": "ip-adapter.bin", "image_encoder": "siglip-so400m-patch14-384"}
# InfiniteYou as ByteDance/InfiniteYou publishes it (infu_flux_v1.0/<variant>/), in models/infinite_you.
INFINITEYOU_FILES = {"projector": "infu_flux_v1.0/aes_stage2/image_proj_model.bin",
                     "infusenet": "infu_flux_v1.0/aes_stage2/InfuseNetModel"}
# Step1X-Edit's prompt encoder: the Qwen/Qwen2.5-VL-7B-Instruct folder as published, in models/text_encoders.
QWEN_VL_FOLDER = "Qwen2.5-VL-7B-Instruct"
# Nexus-Gen (DiffSynth-Studio/Nexus-GenV2): its generation decoder (DiT + adapter) in models/diffusion_models, its
# autoregressive model's folder (shards, config.json, processor/) in models/text_encoders.
NEXUS_GEN_FILES = {"decoder": "generation_decoder.bin", "model": "Nexus-GenV2"}
# The bundled demo model's files (flux_core.demo), listed by the loaders from the pack's own folders, and its
# LoRA's training set (flux_core/demo/datasets/), which the trainer node finds by name.
DEMO_FILES = {slot: Path(name).name for slot, name in demo.FILES.items()}
DEMO_DATASET = demo.STRIPES_DATASET
DEMO_LORA = Path(demo.LORA_FILE).name
# The demo's prompts in the wording it was trained with (flux_core.demo.scenes): a red circle, and a green circle for
# the stripes LoRA (trained on striped circles).
DEMO_PROMPT = Scene("circle", "red", "left", "blue").prompt()
DEMO_LORA_PROMPT = Scene("circle", "green", "left", "white").prompt()
INPUT_IMAGES = [EXAMPLE_IMAGE, INPAINT_IMAGE, REFERENCE_IMAGE, FACE_IMAGE, *ELIGEN_REGIONS]  # what the examples load
# (ComfyUI/input/)


def models_note(dit: str) -> str:
    return (f"## Model files\n\nPut these into ComfyUI's model folders:\n\n"
            f"- `models/diffusion_models/{dit}`\n"
            f"- `models/text_encoders/clip_l.safetensors` and `t5xxl_fp16.safetensors` (fp8 and scaled-fp8 T5 "
            f"files work too)\n"
            f"- `models/vae/ae.safetensors`\n\n"
            f"Instead of a file, the DiT loader's `modelscope_id` can name a ModelScope model to download "
            f"(e.g. `black-forest-labs/FLUX.1-dev:flux1-dev.safetensors`).\n\n"
            f"FluxCore nodes take and give native IMAGE, MASK, LATENT and CONDITIONING, so core nodes such as "
            f"FluxGuidance, SetLatentNoiseMask or ReferenceLatent plug in between them.")


class Graph:
    """A workflow being built: nodes with their sockets, links between them."""

    TITLE_H, GAP = 30, 40  # the title bar is drawn above a node's pos; space between stacked nodes

    def __init__(self, classes: dict[str, type]):
        self.classes = classes
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.bottom: dict[int, float] = {}  # column x -> first free y below what is stacked there

    def node(self, type_: str, x: int, values=(), size=None, title=None, models=(), **connect) -> int:
        """Adds a node at the bottom of column `x`; `connect` names each input's source as (node id, slot)."""
        nid = len(self.nodes) + 1
        if type_ in ("Note", "MarkdownNote"):
            inputs, outputs, props = [], [], {}
        elif type_ == "Reroute":
            inputs, outputs, props = [{"name": "", "type": "*", "link": None}], [{"name": "", "type": "*", "links": []}], {}
        else:
            cls = self.classes[type_]
            spec = cls.INPUT_TYPES()
            inputs = [dict({"name": name, "type": s[0], "link": None}, **({"shape": 7} if group == "optional" else {}))
                      for group in ("required", "optional") for name, s in (spec.get(group) or {}).items()
                      if not is_widget(tuple(s))]
            names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                       for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
            expected = saved_value_count(spec)
            if len(values) != expected:
                raise ValueError(f"{type_}: {len(values)} widget values given, its widgets take {expected}")
            props = {"Node name for S&R": type_}
            if models:
                props["models"] = [{"name": name, "url": MODEL_URLS[name], "directory": folder} for name, folder in models]
        rows = max(len(inputs), len(outputs))
        size = size or [320, 14 + 20 * rows + 24 * len(values)]  # what the frontend computes, ~
        y = self.bottom.get(x, 0)
        self.bottom[x] = y + size[1] + self.TITLE_H + self.GAP
        node = {"id": nid, "type": type_, "pos": [x, y], "size": list(size), "flags": {}, "order": 0, "mode": 0,
                "inputs": inputs, "outputs": outputs, "properties": props}
        if title:
            node["title"] = title
        if type_ != "Reroute":
            node["widgets_values"] = list(values)
        self.nodes.append(node)
        for name, (src, slot) in connect.items():
            self.connect(src, slot, nid, name)
        return nid

    def connect(self, src: int, slot: int, dst: int, input_name: str) -> None:
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        index = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input_name or
                     (target["type"] == "Reroute" and input_name == "input"))
        link_id = len(self.links) + 1
        kind = source["outputs"][slot]["type"]
        if target["type"] == "Reroute":
            target["outputs"][0]["type"] = kind
        self.links.append([link_id, src, slot, dst, index, kind])
        target["inputs"][index]["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)

    def workflow(self) -> dict:
        # "order": the position of each node in an execution order (inputs first), as the frontend saves it.
        done: list[int] = []
        deps = {n["id"]: {l[1] for l in self.links if l[3] == n["id"]} for n in self.nodes}
        while len(done) < len(self.nodes):
            ready = [nid for nid in sorted(deps) if nid not in done and deps[nid] <= set(done)]
            done.extend(ready)
        for n in self.nodes:
            n["order"] = done.index(n["id"])
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [480, 60]}},
                "version": 0.4}


LOADER_MODELS = [("clip_l.safetensors", "text_encoders"), ("t5xxl_fp16.safetensors", "text_encoders")]
# Columns, left to right: notes and input images, loaders (and image scaling), prompts and latents, conditioning
# steps (Kontext), sampler and decode, output.
NOTES, LOADERS, PROMPTS, CONDITIONING = -440, 0, 440, 900


def loaders(g: Graph, dit: str) -> tuple[int, int, int]:
    g.node("MarkdownNote", NOTES, [models_note(dit)], size=[400, 330], title="Model files")
    model = g.node("FluxCoreDiTLoader", LOADERS, [dit, "default", ""], models=[(dit, "diffusion_models")])
    text_encoders = g.node("FluxCoreTextEncoderLoader", LOADERS, ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
                           models=LOADER_MODELS)
    vae = g.node("FluxCoreVAELoader", LOADERS, ["ae.safetensors"], models=[("ae.safetensors", "vae")])
    return model, text_encoders, vae


def prompts(g: Graph, text_encoders: int, text: str, guidance: float) -> tuple[int, int]:
    positive = g.node("FluxCoreTextEncode", PROMPTS, [text, guidance, 0], size=[400, 200], title="Prompt",
                      text_encoders=(text_encoders, 0))
    negative = g.node("FluxCoreTextEncode", PROMPTS, ["", guidance, 0], size=[400, 160],
                      title="Negative prompt (used when cfg > 1)", text_encoders=(text_encoders, 0))
    return positive, negative


def load_image(g: Graph, title: str | None = None) -> int:
    g.node("Note", NOTES, [f"Input image: copy {EXAMPLE_IMAGE} from FluxCore's example_workflows folder into "
                           f"ComfyUI's input folder (ComfyUI/input/), or upload your own image below. Its "
                           f"transparent rectangle is the mask (the area the inpainting example changes)."],
           size=[400, 110], title="Input image")
    return g.node("LoadImage", NOTES, [EXAMPLE_IMAGE, "image"], size=[400, 360], title=title)


def finish(g: Graph, model, positive, negative, latent, vae, seed, control, denoise, prefix, x=CONDITIONING,
           tiled=False, cfg=1.0, steps=28, save_size=(520, 560)):
    """Sampler, decode and save; `tiled`: the DiT and the decode in 1024-px tiles (128 latent pixels, stride 64).
    positive / negative: a node id (its output 0) or (node id, output slot)."""
    positive, negative = (c if isinstance(c, tuple) else (c, 0) for c in (positive, negative))
    sampler = g.node("FluxCoreSampler", x, [seed, control, steps, cfg, -1.0, 3.0, denoise, tiled, 128, 64, False],
                     model=(model, 0), positive=positive, negative=negative, latent_image=(latent, 0))
    image = g.node("FluxCoreVAEDecode", x, [tiled, 128, 64], samples=(sampler, 0), vae=vae)
    g.node("SaveImage", x + 380, [prefix], size=list(save_size), images=(image, 0))


def text_to_image(g: Graph) -> None:
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    positive, negative = prompts(g, te, "A red fox sitting in fresh snow at sunrise, soft golden light, "
                                        "shallow depth of field, detailed fur", 3.5)
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [1024, 1024, 1])
    finish(g, model, positive, negative, latent, (vae, 0), 156680208700286, "randomize", 1.0,
           "FluxCore/text_to_image")


def image_to_image(g: Graph) -> None:
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    positive, negative = prompts(g, te, "A watercolor painting, soft washes of colour, visible paper texture", 3.5)
    image = load_image(g)
    scaled = g.node("ImageScale", LOADERS, ["lanczos", 1024, 1024, "center"], title="Scale to 1024x1024",
                    image=(image, 0))
    latent = g.node("FluxCoreVAEEncode", PROMPTS, [False, 128, 64], pixels=(scaled, 0), vae=(vae, 0))
    finish(g, model, positive, negative, latent, (vae, 0), 42, "fixed", 0.75, "FluxCore/image_to_image")


def kontext_edit(g: Graph) -> None:
    model, te, vae = loaders(g, "flux1-kontext-dev.safetensors")
    positive, negative = prompts(g, te, "Change the sky to a starry night, keep everything else the same", 2.5)
    image = load_image(g, "Image to edit")
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [1024, 1024, 1])
    reference = g.node("FluxCoreKontextReference", CONDITIONING, [], conditioning=(positive, 0), vae=(vae, 0),
                       image=(image, 0))
    finish(g, model, reference, negative, latent, (vae, 0), 7, "fixed", 1.0, "FluxCore/kontext_edit",
           x=CONDITIONING + 380)


def mixed_native(g: Graph) -> None:
    """Kontext inpainting: FluxCore models, sampler and VAE with core nodes for guidance, reference and mask."""
    model, te, vae_loader = loaders(g, "flux1-kontext-dev.safetensors")
    g.bottom[LOADERS + 340] = g.nodes[vae_loader - 1]["pos"][1] + 20  # beside the VAE loader
    vae = g.node("Reroute", LOADERS + 340, size=[75, 26], input=(vae_loader, 0))
    positive, negative = prompts(g, te, "A bouquet of sunflowers in a blue vase", 3.5)
    image = load_image(g, "Image (paint the area to change in the MaskEditor)")
    g.node("Note", NOTES, ["Right-click the image and choose 'Open in MaskEditor', paint over the area to "
                           "regenerate and save (the example image comes with its table area cleared). Only the "
                           "painted area changes (SetLatentNoiseMask); the whole image is also given to Kontext as "
                           "a reference (ReferenceLatent)."],
           size=[400, 120], title="How to use")
    scaled = g.node("ImageScale", LOADERS, ["lanczos", 1024, 1024, "disabled"], image=(image, 0))
    g.node("PreviewImage", LOADERS, [], size=[320, 320], title="Scaled input", images=(scaled, 0))
    encoded = g.node("FluxCoreVAEEncode", PROMPTS, [False, 128, 64], pixels=(scaled, 0), vae=(vae, 0))
    masked = g.node("SetLatentNoiseMask", PROMPTS, [], samples=(encoded, 0), mask=(image, 1))
    guided = g.node("FluxGuidance", CONDITIONING, [2.5], conditioning=(positive, 0))
    reference = g.node("ReferenceLatent", CONDITIONING, [], conditioning=(guided, 0), latent=(encoded, 0))
    zero = g.node("ConditioningZeroOut", CONDITIONING, [], conditioning=(negative, 0))
    finish(g, model, reference, zero, masked, (vae, 0), 1234, "fixed", 1.0, "FluxCore/mixed_native",
           x=CONDITIONING + 380)


def controlnet_loader(g: Graph, kind: str) -> int:
    file = CONTROLNET_FILES[kind]
    g.node("MarkdownNote", NOTES, [f"## ControlNet\n\nDownload `{file.split('/')[-1]}` from "
                                   f"https://huggingface.co/{CONTROLNET_REPOS[kind]} into "
                                   f"`models/controlnet/{file.split('/')[0]}/` (or put it there under any name and "
                                   f"pick it in Load ControlNet)."], size=[400, 150], title="ControlNet file")
    return g.node("FluxCoreControlNetLoader", LOADERS, [file, "default"])


def controlnet_inpainting(g: Graph) -> None:
    """alimama's Inpainting-Beta: the image and its mask from LoadImage (painted in the MaskEditor)."""
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    controlnet = controlnet_loader(g, "inpainting")
    positive, negative = prompts(g, te, "A bouquet of sunflowers in a blue vase on a wooden table", 3.5)
    image = load_image(g, "Image (paint the area to repaint in the MaskEditor)")
    g.node("Note", NOTES, ["Right-click the image, 'Open in MaskEditor', paint over the area to repaint and save "
                           "(the example image comes with its table area cleared). The ControlNet sees the image "
                           "with that area blacked out and the mask; the whole image is generated anew around it."],
           size=[400, 120], title="How to use")
    applied = g.node("FluxCoreApplyControlNet", CONDITIONING, ["none", 0.9, 0.0, 1.0], positive=(positive, 0),
                     negative=(negative, 0), control_net=(controlnet, 0), image=(image, 0), vae=(vae, 0),
                     mask=(image, 1))
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [1024, 1024, 1])
    finish_with(g, model, applied, latent, vae, 2024, 1.0, "FluxCore/controlnet_inpainting", CONDITIONING + 380)


def controlnet_union_canny(g: Graph) -> None:
    """InstantX's Union-alpha in canny mode: the edges of the input image, made by FluxCore's Canny Map node."""
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    controlnet = controlnet_loader(g, "union")
    positive, negative = prompts(g, te, "A cozy cabin in a snowy mountain valley at dusk, warm light in the windows",
                                 3.5)
    image = load_image(g)
    scaled = g.node("ImageScale", LOADERS, ["lanczos", 1024, 1024, "center"], title="Scale to 1024x1024",
                    image=(image, 0))
    edges = g.node("FluxCoreCannyMap", PROMPTS, [100, 200, 0.0], image=(scaled, 0))
    g.node("PreviewImage", PROMPTS, [], size=[320, 320], title="Canny edges", images=(edges, 0))
    applied = g.node("FluxCoreApplyControlNet", CONDITIONING, ["canny", 0.7, 0.0, 1.0], positive=(positive, 0),
                     negative=(negative, 0), control_net=(controlnet, 0), image=(edges, 0), vae=(vae, 0))
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [1024, 1024, 1])
    finish_with(g, model, applied, latent, vae, 31, 1.0, "FluxCore/controlnet_union_canny", CONDITIONING + 380)


def controlnet_upscale(g: Graph) -> None:
    """jasperai's Upscaler as DiffSynth-Studio runs it: the image scaled 2x is both the control image (0.7) and the
    input latent (denoise 0.99); the DiT runs in tiles, so 2048x2048 and larger fit."""
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    controlnet = controlnet_loader(g, "upscaler")
    positive, negative = prompts(g, te, "A detailed, sharp photograph of a house in green hills by a wooden table, "
                                        "blue sky and sun", 3.5)
    image = load_image(g, "Image to upscale")
    scaled = g.node("ImageScaleBy", LOADERS, ["lanczos", 2.0], title="Scale 2x", image=(image, 0))
    g.node("Note", NOTES, ["Upscaling: the image is scaled 2x (ImageScaleBy), then FLUX redraws it with the "
                           "upscaler ControlNet following the scaled image. The sampler's tiled_dit and the VAE "
                           "nodes' tiled option keep 2048x2048 and larger within memory (tiles of 1024 px)."],
           size=[400, 120], title="How to use")
    latent = g.node("FluxCoreVAEEncode", PROMPTS, [True, 128, 64], pixels=(scaled, 0), vae=(vae, 0))
    applied = g.node("FluxCoreApplyControlNet", CONDITIONING, ["none", 0.7, 0.0, 1.0], positive=(positive, 0),
                     negative=(negative, 0), control_net=(controlnet, 0), image=(scaled, 0), vae=(vae, 0))
    finish_with(g, model, applied, latent, vae, 99, 0.99, "FluxCore/controlnet_upscale", CONDITIONING + 380,
                tiled=True)


def finish_with(g: Graph, model, applied, latent, vae, seed, denoise, prefix, x, tiled=False):
    """finish() on Apply ControlNet's positive and negative outputs."""
    finish(g, model, (applied, 0), (applied, 1), latent, (vae, 0), seed, "fixed", denoise, prefix, x=x, tiled=tiled)


def input_image(g: Graph, name: str, note: str, title: str) -> int:
    g.node("Note", NOTES, [f"Input image: copy {name} from FluxCore's example_workflows folder into ComfyUI's input "
                           f"folder (ComfyUI/input/), or upload your own image below. {note}"],
           size=[400, 110], title="Input image")
    return g.node("LoadImage", NOTES, [name, "image"], size=[400, 360], title=title)


def ipadapter_instantx(g: Graph) -> None:
    """InstantX's FLUX.1-dev IP-Adapter: the reference image's look carried into a new picture (weight 0.7)."""
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    g.node("MarkdownNote", NOTES, [
        "## IP-Adapter files\n\n- `models/ipadapter/ip-adapter.bin` from "
        "https://huggingface.co/InstantX/FLUX.1-dev-IP-Adapter\n- its image encoder, SigLIP so400m: the "
        "https://huggingface.co/google/siglip-so400m-patch14-384 folder as "
        f"`models/clip_vision/{IPADAPTER_FILES['image_encoder']}/` (config.json + model.safetensors), or ComfyUI's "
        "`sigclip_vision_patch14_384.safetensors` in `models/clip_vision/` (pick it in the loader).\n\nXLabs' "
        "flux-ip-adapter.safetensors works the same way with CLIP ViT-L (clip_vision_l.safetensors)."],
        size=[400, 230], title="IP-Adapter files")
    ipadapter = g.node("FluxCoreIPAdapterLoader", LOADERS, [IPADAPTER_FILES["ipadapter"],
                                                            IPADAPTER_FILES["image_encoder"], "default"],
                       models=[(IPADAPTER_FILES["ipadapter"], "ipadapter")])
    positive, negative = prompts(g, te, "A lighthouse on a rocky coast at night, waves crashing, a sky full of "
                                        "stars", 3.5)
    image = input_image(g, REFERENCE_IMAGE, "Its colours and brush strokes steer the new picture; weight sets how "
                        "much (0.5 to 1).", "Reference image")
    applied = g.node("FluxCoreApplyIPAdapter", CONDITIONING, [0.7, 0.0, 1.0], positive=(positive, 0),
                     negative=(negative, 0), ipadapter=(ipadapter, 0), image=(image, 0))
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [1024, 1024, 1])
    finish_with(g, model, applied, latent, vae, 404, 1.0, "FluxCore/ipadapter_instantx", CONDITIONING + 380)


def infiniteyou(g: Graph) -> None:
    """ByteDance's InfiniteYou: a new picture of the person in the face photo (InfuseNet with an all-black control
    image, guidance 1, as DiffSynth-Studio's example)."""
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    g.node("MarkdownNote", NOTES, [
        "## InfiniteYou files\n\nFrom https://huggingface.co/ByteDance/InfiniteYou download "
        "`infu_flux_v1.0/aes_stage2/` (image_proj_model.bin and the InfuseNetModel folder) into "
        "`models/infinite_you/infu_flux_v1.0/aes_stage2/` (`sim_stage1` for more likeness).\n\nThe face photo "
        "needs `pip install insightface onnxruntime facexlib opencv-python`, the `supports/insightface/models/"
        "antelopev2/` folder of the same repository in `models/insightface/models/antelopev2/`, and facexlib's "
        "ArcFace weights. Without them, connect a precomputed embedding (Load Face Embedding) to face_embedding "
        "instead."], size=[400, 300], title="InfiniteYou files")
    infu = g.node("FluxCoreInfiniteYouLoader", LOADERS, [INFINITEYOU_FILES["projector"], INFINITEYOU_FILES["infusenet"],
                                                         "default"])
    positive, negative = prompts(g, te, "A portrait of the person as an astronaut inside a space station, soft "
                                        "window light, detailed photograph", 3.5)
    face = input_image(g, FACE_IMAGE, "Replace it with a photo of one person's face, clearly visible: the drawing "
                       "shipped here shows where it goes and may not be found as a face.", "Face photo")
    applied = g.node("FluxCoreApplyInfiniteYou", CONDITIONING, [1.0, 1.0, 0.0, 1.0], positive=(positive, 0),
                     negative=(negative, 0), infiniteyou=(infu, 0), vae=(vae, 0), face_image=(face, 0))
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [1024, 1024, 1])
    finish_with(g, model, applied, latent, vae, 1111, 1.0, "FluxCore/infiniteyou", CONDITIONING + 380)


def eligen(g: Graph) -> None:
    """EliGen: one prompt for the whole picture and one per painted region (two EliGen Entity nodes chained onto the
    prompt), each region LoadImage's mask of a shipped image (its transparent area, as painted in the MaskEditor)."""
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    g.node("MarkdownNote", NOTES, [
        "## EliGen\n\nEach EliGen Entity node adds a prompt that acts only inside its mask; the prompt describes the "
        "whole picture. Chain one Entity node per region (onto 'negative' for regional negative prompts, used "
        "when cfg > 1).\n\nFor the trained effect, download `model_bf16.safetensors` from "
        "https://modelscope.cn/models/DiffSynth-Studio/Eligen into `models/loras/` and put Load FLUX LoRA "
        "(FluxCore) between Load DiT and the sampler; EliGen runs without it too, with a weaker hold on the "
        "regions."], size=[400, 250], title="EliGen")
    positive, negative = prompts(g, te, "A wooden kitchen table in soft morning light, a bowl of fruit and a teapot "
                                        "on it, photograph", 3.5)
    regions = []
    for name, side in zip(ELIGEN_REGIONS, ("left", "right")):
        regions.append(input_image(g, name, f"Its transparent area is the {side} entity's region: right-click, "
                                   f"'Open in MaskEditor' and paint another one.", f"Region of the {side} entity"))
    first = g.node("FluxCoreEliGenEntity", CONDITIONING, ["a wooden bowl full of shiny red apples"], size=[400, 160],
                   title="Entity: left region", conditioning=(positive, 0), text_encoders=(te, 0),
                   mask=(regions[0], 1))
    second = g.node("FluxCoreEliGenEntity", CONDITIONING, ["a blue ceramic teapot with steam rising"], size=[400, 160],
                    title="Entity: right region", conditioning=(first, 0), text_encoders=(te, 0),
                    mask=(regions[1], 1))
    # 768x768 (FLUX works well there) keeps this example's test run short; the masks scale to any square size.
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [768, 768, 1])
    finish(g, model, second, negative, latent, (vae, 0), 2025, "fixed", 1.0, "FluxCore/eligen", x=CONDITIONING + 460)


INPAINT_NOTE = ("Its transparent rectangle is the mask (1 = redraw): right-click the image, 'Open in MaskEditor', "
                "paint another area and save. The image's size is the output's (512x512 here).")


def flux_fill(g: Graph) -> None:
    """FLUX.1-Fill-dev with ComfyUI's own InpaintModelConditioning (and its VAE): the image with the masked area
    greyed and the mask go into the conditioning (concat_latent_image, concat_mask), which FluxCore's sampler feeds
    to the Fill DiT's extra input channels; noise_mask keeps the rest of the image. Guidance 30, as BFL recommends."""
    g.node("MarkdownNote", NOTES, [
        "## Model files\n\nPut these into ComfyUI's model folders:\n\n"
        "- `models/diffusion_models/flux1-fill-dev.safetensors` from "
        "https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev\n"
        "- `models/text_encoders/clip_l.safetensors` and `t5xxl_fp16.safetensors`\n"
        "- `models/vae/ae.safetensors` (FLUX.1's VAE)\n\n"
        "The VAE is loaded by ComfyUI's own Load VAE: InpaintModelConditioning and VAE Decode are core nodes. "
        "FluxCore's sampler reads the conditioning they make (concat_latent_image, concat_mask) as ComfyUI's "
        "Flux model does, and the latent's noise_mask. BFL recommends guidance 30 for Fill."],
        size=[400, 330], title="Model files")
    model = g.node("FluxCoreDiTLoader", LOADERS, ["flux1-fill-dev.safetensors", "default", ""],
                   models=[("flux1-fill-dev.safetensors", "diffusion_models")])
    te = g.node("FluxCoreTextEncoderLoader", LOADERS, ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
                models=LOADER_MODELS)
    vae = g.node("VAELoader", LOADERS, ["ae.safetensors"], models=[("ae.safetensors", "vae")])
    positive, negative = prompts(g, te, "A bouquet of sunflowers in a blue vase on a wooden table", 30.0)
    image = input_image(g, INPAINT_IMAGE, INPAINT_NOTE, "Image (paint the area to fill in the MaskEditor)")
    inpaint = g.node("InpaintModelConditioning", CONDITIONING, [True], positive=(positive, 0),
                     negative=(negative, 0), vae=(vae, 0), pixels=(image, 0), mask=(image, 1))
    x = CONDITIONING + 380
    sampler = g.node("FluxCoreSampler", x, [512, "fixed", 28, 1.0, -1.0, 3.0, 1.0, False, 128, 64, False],
                     model=(model, 0), positive=(inpaint, 0), negative=(inpaint, 1), latent_image=(inpaint, 2))
    decoded = g.node("VAEDecode", x, [], samples=(sampler, 0), vae=(vae, 0))
    g.node("SaveImage", x + 380, ["FluxCore/flux_fill"], size=[520, 560], images=(decoded, 0))


def flex2(g: Graph) -> None:
    """FLEX.2-preview: inpainting and control built into the DiT's input (FLEX.2 Inputs (FluxCore)): the image and
    its mask, and the image's canny edges as the control image (strength 0.5 for the first half of the steps)."""
    g.node("MarkdownNote", NOTES, [
        models_note("Flex.2-preview.safetensors").replace(
            "`models/diffusion_models/Flex.2-preview.safetensors`",
            "`models/diffusion_models/Flex.2-preview.safetensors` from https://huggingface.co/ostris/Flex.2-preview")
        + "\n\nFLEX.2 Inputs (FluxCore): inpaint_image + inpaint_mask (1 = redraw) and/or a control image (line "
          "art, depth, pose); control_strength scales it, control_stop is the fraction of the steps it acts for."],
        size=[400, 400], title="Model files")
    model = g.node("FluxCoreDiTLoader", LOADERS, ["Flex.2-preview.safetensors", "default", ""],
                   models=[("Flex.2-preview.safetensors", "diffusion_models")])
    te = g.node("FluxCoreTextEncoderLoader", LOADERS, ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
                models=LOADER_MODELS)
    vae = g.node("FluxCoreVAELoader", LOADERS, ["ae.safetensors"], models=[("ae.safetensors", "vae")])
    positive, negative = prompts(g, te, "A basket of red apples on a wooden table in a sunny garden", 3.5)
    image = input_image(g, INPAINT_IMAGE, INPAINT_NOTE, "Image (paint the area to redraw in the MaskEditor)")
    edges = g.node("FluxCoreCannyMap", PROMPTS, [100, 200, 0.0], image=(image, 0))
    g.node("PreviewImage", PROMPTS, [], size=[320, 320], title="Canny edges (control image)", images=(edges, 0))
    flex = g.node("FluxCoreFlexInputs", CONDITIONING, [0.5, 0.5], positive=(positive, 0), negative=(negative, 0),
                  vae=(vae, 0), inpaint_image=(image, 0), inpaint_mask=(image, 1), control_image=(edges, 0))
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [512, 512, 1])
    finish(g, model, (flex, 0), (flex, 1), latent, (vae, 0), 202, "fixed", 1.0, "FluxCore/flex2",
           x=CONDITIONING + 380)


def step1x_edit(g: Graph) -> None:
    """Step1X-Edit: Qwen2.5-VL reads the instruction with the image; its connector makes the DiT's text at each step
    and the image's latent joins the image tokens. True CFG 6 with an empty negative instruction (same image), as
    DiffSynth-Studio's example."""
    dit = "step1x-edit-i1258.safetensors"
    g.node("MarkdownNote", NOTES, [
        "## Model files\n\nFrom https://huggingface.co/stepfun-ai/Step1X-Edit:\n\n"
        f"- `models/diffusion_models/{dit}` (the DiT and the connector: both loaders take this file)\n"
        f"- `models/text_encoders/{QWEN_VL_FOLDER}/`: the whole https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct "
        "folder (model-*.safetensors, config.json and the processor files: preprocessor_config.json, "
        "tokenizer.json, tokenizer_config.json, chat_template.json, ...)\n"
        "- `models/vae/ae.safetensors` (FLUX.1's VAE; Step1X-Edit's vae.safetensors is the same autoencoder)\n\n"
        "No CLIP or T5. DiffSynth-Studio's example renders 832x1248 with cfg 6; this one renders 512x512: "
        "give the image to edit at the Empty Latent's size (Scale) for other sizes."],
        size=[400, 330], title="Model files")
    model = g.node("FluxCoreDiTLoader", LOADERS, [dit, "default", ""], models=[(dit, "diffusion_models")])
    connector = g.node("FluxCoreStep1XConnectorLoader", LOADERS, [dit])
    qwen = g.node("FluxCoreQwenVLLoader", LOADERS, [QWEN_VL_FOLDER])
    vae = g.node("FluxCoreVAELoader", LOADERS, ["ae.safetensors"], models=[("ae.safetensors", "vae")])
    image = input_image(g, REFERENCE_IMAGE, "Step1X-Edit changes it as the instruction says.", "Image to edit")
    scaled = g.node("ImageScale", LOADERS, ["lanczos", 512, 512, "center"], title="Scale to 512x512",
                    image=(image, 0))
    sources = dict(qwen_vl=(qwen, 0), connector=(connector, 0), vae=(vae, 0), image=(scaled, 0))
    positive = g.node("FluxCoreStep1XEncode", PROMPTS, ["Turn the night into a sunny afternoon with a blue sky, "
                                                        "keep the hills, the cypress and the village"],
                      size=[400, 200], title="Edit instruction", **sources)
    negative = g.node("FluxCoreStep1XEncode", PROMPTS, [""], size=[400, 160],
                      title="Negative instruction (same image; cfg 6)", **sources)
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [512, 512, 1])
    finish(g, model, positive, negative, latent, (vae, 0), 1258, "fixed", 1.0, "FluxCore/step1x_edit",
           x=CONDITIONING, cfg=6.0)


def nexus_gen(g: Graph) -> None:
    """Nexus-Gen text-to-image: the prompt through the autoregressive Qwen2.5-VL and the generation decoder's adapter
    (the pooled vector from CLIP-L), the negative prompt through T5 as DiffSynth-Studio does; true CFG 2.0, as its
    example."""
    decoder, ar = NEXUS_GEN_FILES["decoder"], NEXUS_GEN_FILES["model"]
    g.node("MarkdownNote", NOTES, [
        "## Model files\n\nFrom DiffSynth-Studio/Nexus-GenV2 (https://modelscope.cn/models/DiffSynth-Studio/"
        "Nexus-GenV2):\n\n"
        f"- `models/diffusion_models/{decoder}` (the DiT and the generation adapter: both loaders take this file; "
        "`edit_decoder.bin` is the editing one, used with an image on Nexus-Gen Encode's `image`)\n"
        f"- `models/text_encoders/{ar}/`: the autoregressive model (model-*.safetensors with their index, "
        "config.json) and its `processor/` folder\n"
        "- `models/text_encoders/clip_l.safetensors` and `t5xxl_fp16.safetensors` (CLIP-L's pooled vector; T5 "
        "encodes the negative prompt)\n- `models/vae/ae.safetensors`\n\nDiffSynth-Studio's example samples with "
        "cfg 2.0; this one renders 512x512."], size=[400, 360], title="Model files")
    model = g.node("FluxCoreDiTLoader", LOADERS, [decoder, "default", ""])
    adapter = g.node("FluxCoreNexusGenAdapterLoader", LOADERS, [decoder])
    ar_model = g.node("FluxCoreNexusGenLoader", LOADERS, [ar])
    te = g.node("FluxCoreTextEncoderLoader", LOADERS, ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
                models=LOADER_MODELS)
    vae = g.node("FluxCoreVAELoader", LOADERS, ["ae.safetensors"], models=[("ae.safetensors", "vae")])
    positive = g.node("FluxCoreNexusGenEncode", PROMPTS, ["A red fox sitting in fresh snow at sunrise, soft golden "
                                                          "light, detailed fur", 3.5, 512, 512],
                      size=[400, 240], title="Prompt (Nexus-Gen)", nexus_gen=(ar_model, 0), adapter=(adapter, 0),
                      text_encoders=(te, 0))
    negative = g.node("FluxCoreTextEncode", PROMPTS, ["", 3.5, 0], size=[400, 160],
                      title="Negative prompt (T5; cfg 2)", text_encoders=(te, 0))
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [512, 512, 1])
    finish(g, model, positive, negative, latent, (vae, 0), 81, "fixed", 1.0, "FluxCore/nexus_gen", cfg=2.0)


DEMO_NOTE = ("## The bundled demo model\n\nNothing to download: FluxCore ships a tiny model with FLUX.1's "
             "architecture (its own DiT, VAE, CLIP-L and T5 at small widths), trained on pictures of one coloured "
             "shape on a plain background. The loaders list its files (`fluxcore_demo_*`) from the pack's own "
             f"folder.\n\nPrompts in the wording it was trained with: *{DEMO_PROMPT}*; shapes "
             f"{', '.join(SHAPES)}; colours {', '.join(COLOURS)}; places {' / '.join(POSITION_WORDS.values())}. It "
             f"draws {demo.WIDTH}x{demo.HEIGHT} (its training size) in a few seconds on a CPU; it has no guidance "
             "embedder, so `guidance` does nothing (like FLUX.1-schnell).")


def demo_loaders(g: Graph) -> tuple[int, int, int]:
    model = g.node("FluxCoreDiTLoader", LOADERS, [DEMO_FILES["dit"], "default", ""])
    text_encoders = g.node("FluxCoreTextEncoderLoader", LOADERS, [DEMO_FILES["clip"], DEMO_FILES["t5"]])
    vae = g.node("FluxCoreVAELoader", LOADERS, [DEMO_FILES["vae"]])
    return model, text_encoders, vae


def demo_finish(g: Graph, model, text_encoders, vae, text: str, seed: int, prefix: str, x=CONDITIONING) -> None:
    """The demo's prompt (T5 length 0: its tokenizer's 32), an empty negative, 128x128, 30 steps, cfg 1."""
    positive, negative = prompts(g, text_encoders, text, 3.5)
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [demo.WIDTH, demo.HEIGHT, 1])
    finish(g, model, positive, negative, latent, (vae, 0), seed, "randomize", 1.0, prefix, x=x, steps=30,
           save_size=(320, 380))


def demo_text_to_image(g: Graph) -> None:
    g.node("MarkdownNote", NOTES, [DEMO_NOTE], size=[400, 330], title="Demo model")
    model, te, vae = demo_loaders(g)
    demo_finish(g, model, te, vae, DEMO_PROMPT, 7, "FluxCore/demo_text_to_image")


def demo_lora(g: Graph) -> None:
    """The trainer node end to end on the demo model: a LoRA on the demo's striped circles (rank 8, 1000 steps, as
    flux_core.demo.build trains the shipped one: about a minute on a CPU), then loaded (trained_lora) and drawn: a
    green circle on a white background, striped."""
    g.node("MarkdownNote", NOTES, [
        "## Train a LoRA on the demo model\n\nRuns as it is on any machine, nothing to download. Train FLUX LoRA "
        f"(FluxCore) trains on `{DEMO_DATASET}` (pictures of circles drawn with horizontal stripes and their "
        "captions, shipped with the pack; a relative `dataset_path` is looked up in ComfyUI's input folder, then "
        "among the pack's demo datasets) with the demo model, in a separate process: progress and the loss curve "
        "show on the node. The LoRA goes to `models/loras/` and straight into Load FLUX LoRA's `trained_lora` input "
        "(which wins over its `lora_name`), and the sampler draws a green circle, striped.\n\n"
        "Queue it again: the sampler's seed changes, the LoRA is not trained again (its inputs did not change). "
        f"Set `strength` to 0 to see the demo model without it. `{DEMO_LORA}` in lora_name is the demo's own LoRA "
        "(used when trained_lora is not connected)."],
        size=[400, 400], title="Demo LoRA")
    model, te, vae = demo_loaders(g)
    trainer = g.node("FluxCoreTrainLoRA", PROMPTS, [
        DEMO_FILES["dit"], DEMO_FILES["clip"], DEMO_FILES["t5"], DEMO_FILES["vae"], DEMO_DATASET,
        "my_demo_stripes", 8, 1e-3, 1, 1000, 1024 * 1024, 0, "", 0, False, False, True, 0, "fixed", 1,
        1000, "", 300],
        size=[400, 640], title="Train the LoRA (float32 on a CPU, bf16 on a GPU)")
    lora = g.node("FluxCoreLoraLoader", CONDITIONING, [DEMO_LORA, 1.0], model=(model, 0), trained_lora=(trainer, 0))
    demo_finish(g, lora, te, vae, DEMO_LORA_PROMPT, 3, "FluxCore/demo_lora",
                x=CONDITIONING + 380)


def native_ksampler(g: Graph) -> None:
    """FluxCore's DiT as a native MODEL: LoraLoaderModelOnly, ModelSamplingFlux and KSampler on the loader's MODEL
    output, with a FluxCore adapter (InstantX's Union ControlNet in canny mode) on the conditioning."""
    model, te, vae = loaders(g, "flux1-dev.safetensors")
    g.node("MarkdownNote", NOTES, [
        "## Native sampling\n\nLoad FLUX DiT (FluxCore)'s MODEL output is the same DiT as a native MODEL: ComfyUI's "
        "LoRA loaders, ModelSamplingFlux, KSampler (any sampler and scheduler) and EasyCache work on it. FluxCore's "
        "adapters (Apply ControlNet / IP-Adapter / InfiniteYou, EliGen, FLEX.2) still apply through the "
        "conditioning.\n\nThe LoRA: `" + NATIVE_LORA + "` from https://huggingface.co/ByteDance/Hyper-SD into "
        "`models/loras/` (8 steps at strength 0.125), or any FLUX.1-dev LoRA."], size=[400, 240],
        title="How it works")
    lora = g.node("LoraLoaderModelOnly", LOADERS, [NATIVE_LORA, 0.125], model=(model, 1),
                  models=[(NATIVE_LORA, "loras")])
    shifted = g.node("ModelSamplingFlux", LOADERS, [1.15, 0.5, 1024, 1024], model=(lora, 0))
    controlnet = controlnet_loader(g, "union")
    positive, negative = prompts(g, te, "A lighthouse on a rocky coast at sunset, waves, dramatic clouds", 3.5)
    image = load_image(g)
    scaled = g.node("ImageScale", LOADERS, ["lanczos", 1024, 1024, "center"], title="Scale to 1024x1024",
                    image=(image, 0))
    edges = g.node("FluxCoreCannyMap", PROMPTS, [100, 200, 0.0], image=(scaled, 0))
    applied = g.node("FluxCoreApplyControlNet", CONDITIONING, ["canny", 0.6, 0.0, 0.8], positive=(positive, 0),
                     negative=(negative, 0), control_net=(controlnet, 0), image=(edges, 0), vae=(vae, 0))
    latent = g.node("FluxCoreEmptyLatent", PROMPTS, [1024, 1024, 1])
    sampler = g.node("KSampler", CONDITIONING + 380, [808, "fixed", 8, 1.0, "euler", "simple", 1.0],
                     model=(shifted, 0), positive=(applied, 0), negative=(applied, 1), latent_image=(latent, 0))
    image = g.node("FluxCoreVAEDecode", CONDITIONING + 380, [False, 128, 64], samples=(sampler, 0), vae=(vae, 0))
    g.node("SaveImage", CONDITIONING + 760, ["FluxCore/native_ksampler"], size=[520, 560], images=(image, 0))


WORKFLOWS = {
    "fluxcore_demo_text_to_image": demo_text_to_image,
    "fluxcore_demo_lora": demo_lora,
    "fluxcore_text_to_image": text_to_image,
    "fluxcore_image_to_image": image_to_image,
    "fluxcore_kontext_edit": kontext_edit,
    "fluxcore_mixed_native": mixed_native,
    "fluxcore_controlnet_inpainting": controlnet_inpainting,
    "fluxcore_controlnet_union_canny": controlnet_union_canny,
    "fluxcore_controlnet_upscale": controlnet_upscale,
    "fluxcore_ipadapter_instantx": ipadapter_instantx,
    "fluxcore_infiniteyou": infiniteyou,
    "fluxcore_eligen": eligen,
    "fluxcore_flux_fill": flux_fill,
    "fluxcore_flex2": flex2,
    "fluxcore_step1x_edit": step1x_edit,
    "fluxcore_nexus_gen": nexus_gen,
    "fluxcore_native_ksampler": native_ksampler,
}


def build(name: str) -> dict:
    g = Graph({**NODE_CLASS_MAPPINGS, **core_nodes(INPUT_IMAGES), **native_sampling_nodes([NATIVE_LORA])})
    WORKFLOWS[name](g)
    return g.workflow()


def main() -> None:
    for name in WORKFLOWS:
        path = HERE / f"{name}.json"
        path.write_text(json.dumps(build(name), indent=2) + "\n", encoding="utf-8")
        print("wrote", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
