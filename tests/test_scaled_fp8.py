"""ComfyUI scaled-fp8 DiT files (older `scale_weight` + `scaled_fp8` marker, newer `weight_scale` + `comfy_quant` /
`_quantization_metadata`): every weight equals the literal fp8 * scale, and the output equals that of the same DiT
stored with those dequantised weights."""
import json

import pytest
import torch
from safetensors.torch import save_file

from flux_core.loading.files import CheckpointError
from flux_core.loading.loader import load_model
from flux_core.model_state import state_of
from tests.tiny_dit import bfl_state_dict, dit_inputs, make_diffusers_dit

PREFIX = "model.diffusion_model."
AXES = {"axes_dim": (4, 6, 6)}


@pytest.fixture(scope="module")
def weights():
    return bfl_state_dict(make_diffusers_dit(seed=3))


def quantize(sd, fp8=torch.float8_e4m3fn):
    """(fp8 tensors, scales, literal dequantised weights) for every weight matrix, scaled to fp8's range."""
    q, scales, plain = {}, {}, {}
    for k, v in sd.items():
        if v.dim() == 2:
            s = v.abs().max().float() / torch.finfo(fp8).max
            q[k] = (v.float() / s).to(fp8)
            scales[k[: -len("weight")]] = s
            plain[k] = q[k].float() * s  # the published meaning of a scaled-fp8 weight
        else:
            q[k] = plain[k] = v
    return q, scales, plain


def write_old_style(sd, path):
    q, scales, plain = quantize(sd)
    out = {PREFIX + k: v for k, v in q.items()}
    for layer, s in scales.items():
        out[PREFIX + layer + "scale_weight"] = s.reshape(())
        out[PREFIX + layer + "scale_input"] = torch.tensor(1.0)
    out[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, str(path))
    return plain


def write_new_style(sd, path, fp8=torch.float8_e4m3fn, in_metadata=False, formats=None):
    q, scales, plain = quantize(sd, fp8)
    out = {PREFIX + k: v for k, v in q.items()}
    layers = {}
    for layer, s in scales.items():
        out[PREFIX + layer + "weight_scale"] = s.reshape(())
        conf = {"format": (formats or {}).get(layer[:-1], str(fp8).removeprefix("torch."))}
        layers[PREFIX + layer[:-1]] = conf
        if not in_metadata:
            out[PREFIX + layer + "comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if in_metadata else None
    save_file(out, str(path), metadata=metadata)
    return plain


def inputs():
    return dit_inputs(32)


@pytest.mark.parametrize("style", ["old", "new", "new-metadata", "new-e5m2"])
def test_scaled_fp8_dit_equals_literal_dequantisation(style, weights, tmp_path):
    path = tmp_path / "flux_fp8_scaled.safetensors"
    if style == "old":
        plain = write_old_style(weights, path)
    else:
        plain = write_new_style(weights, path, fp8=torch.float8_e5m2 if style == "new-e5m2" else torch.float8_e4m3fn,
                                in_metadata=style == "new-metadata")
    ours = load_model(path, config=AXES, torch_dtype=torch.float32, kind="dit")
    assert state_of(ours).layout == "bfl+scaled-fp8"
    got = ours.state_dict()
    assert set(got) == set(plain)
    for k, v in plain.items():  # fp8 * scale in float32 is exact: nothing may differ
        assert torch.equal(got[k], v), k
    assert any(not torch.equal(plain[k], weights[k]) for k in plain)  # the file really is quantised

    # Output parity with the same DiT given the dequantised weights as a plain file.
    reference_path = tmp_path / "dequantised.safetensors"
    save_file({k: v.contiguous() for k, v in plain.items()}, str(reference_path))
    reference = load_model(reference_path, config=AXES, torch_dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ours(**inputs()), reference(**inputs()))


@pytest.mark.parametrize("in_metadata", [False, True])
def test_block_formats_are_refused_by_layer_name(in_metadata, weights, tmp_path):
    path = tmp_path / "nvfp4.safetensors"
    write_new_style(weights, path, in_metadata=in_metadata,
                    formats={"double_blocks.0.img_attn.qkv": "nvfp4", "single_blocks.1.linear2": "mxfp8"})
    with pytest.raises(CheckpointError, match=r"^\S*nvfp4.safetensors: 2 layer.*double_blocks\.0\.img_attn\.qkv \(nvfp4\).*"
                                              r"single_blocks\.1\.linear2 \(mxfp8\)"):
        load_model(path, config=AXES, kind="dit")
