"""A LoRA whose safetensors metadata `modelspec.architecture` names another model than the DiT is applied with a
warning naming the file, the architecture string and the model. The strings are the ones kohya's sd-scripts
writes (library/sai_model_spec.py: "<architecture>/<adapter>", e.g. "flux-1-dev/lora")."""
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from flux_core.loading.loader import load_model
from flux_core.lora import LoraArchitectureWarning, clear_lora, load_lora
from tests.tiny_dit import make_diffusers_dit, write_diffusers_dit
from tests.tiny_lora import bfl_shapes, random_pairs


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_arch")
    out = {}
    for name, guidance in (("dev", True), ("schnell", False)):
        ref = make_diffusers_dit(seed=0, guidance_embeds=guidance)
        dit = load_model(write_diffusers_dit(ref, tmp / name), torch_dtype=torch.float32, kind="dit")
        out[name] = (dit, bfl_shapes(ref))
    return out


def kohya_file(path, shapes, architecture):
    layers = {k: v for k, v in shapes.items() if k.startswith("double_blocks.0.img_attn")}
    tensors = {}
    for name, (down, up, alpha) in random_pairs(layers, seed=1).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
    metadata = {"ss_network_module": "networks.lora_flux"}
    if architecture is not None:
        metadata["modelspec.architecture"] = architecture
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("model, architecture, why", [
    ("dev", "flux-1-schnell/lora", r"a FLUX\.1-schnell LoRA on a DiT with guidance_in"),
    ("schnell", "flux-1-dev/lora", r"a FLUX\.1-dev LoRA on a DiT without guidance_in"),
    ("dev", "stable-diffusion-xl-v1-base/lora", r"a LoRA for another model than FLUX\.1"),
    ("schnell", "stable-diffusion-3-medium/lora", r"a LoRA for another model than FLUX\.1"),
])
def test_lora_for_another_model_warns(dits, tmp_path, model, architecture, why):
    dit, shapes = dits[model]
    path = kohya_file(tmp_path / "style.safetensors", shapes, architecture)
    described = "FLUX.1-dev-type DiT (guidance_in)" if model == "dev" else "FLUX.1-schnell-type DiT (no guidance_in)"
    try:
        with pytest.warns(LoraArchitectureWarning) as caught:
            load_lora(dit, str(path))
    finally:
        clear_lora(dit)
    message = str(caught[0].message)
    assert message.startswith(f"{path}: its metadata says modelspec.architecture={architecture!r}")
    assert f"the model is a {described}" in message
    assert caught[0].filename == __file__    # points at the caller's line
    assert re.search(why, message)


@pytest.mark.parametrize("model, architecture", [
    ("dev", "flux-1-dev/lora"), ("schnell", "flux-1-schnell/lora"), ("dev", "flux-1/lora"), ("dev", None),
])
def test_lora_for_this_model_does_not_warn(dits, tmp_path, model, architecture):
    dit, shapes = dits[model]
    path = kohya_file(tmp_path / "style.safetensors", shapes, architecture)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LoraArchitectureWarning)
            report = load_lora(dit, str(path))
    finally:
        clear_lora(dit)
    assert report.layers == ["double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.qkv"]   # applied
