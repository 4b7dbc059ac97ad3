"""LoRA-Encoder (DiffSynth-Studio's FluxLoRAEncoder): a LoRA turned into conditioning tokens.

    loras = check_lora_encoder_inputs(["style.safetensors", ModelConfig(...)], encoder, dit)
    adapter = lora_encoder_adapter(encoder, loras, scale=1.0, dit=dit)   # joins the denoise loop's adapters

Each LoRA (any format lora_tools reads: kohya, diffusers/PEFT, DiffSynth, ...) is read into FluxCore's canonical
form and encoded by the model (flux_core.models.lora_encoder) into its tokens, `scale` times, which are appended
to the positive branch's T5 tokens with zero position ids, as DiffSynth's FluxImageUnit_LoRAEncode does (the
negative branch gets none). Several LoRAs: their tokens one after the other.

The encoder reads the LoRA at every one of its sites (304 in FLUX.1: all ten layers of each double block, the
three of each single block), so a LoRA must cover them all (DiffSynth raises a KeyError otherwise; here every
file's missing layers are listed). Unlike DiffSynth, each layer keeps its own alpha (DiffSynth applies the first
alpha it finds to all layers); on LoRAs with one alpha, the usual case, the two agree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lora_tools import LoraError, LoraFile

from .adapters import Contribution, DiTCall
from .dit_inputs import DiTInputs
from .loading.errors import CheckpointError
from .lora import read_lora_for
from .math import text_ids
from .model_config import ModelConfig, ModelFileError
from .models.lora_sites import dit_lora_sites, site_mismatch
from .vram import compute_place

_LISTED = 5


class LoraEncoderInputError(ValueError):
    """LoRAs the LoRA-Encoder cannot encode; the message names every file and what is wrong with it."""


def check_lora_encoder_inputs(value, encoder, dit, param: str = "lora_encoder_inputs") -> list[LoraFile]:
    """Every LoRA of `value` (a path, ModelConfig, LoraFile or a list of them) read and checked against the
    encoder and the DiT; all problems listed at once."""
    check_encoder_fits(encoder, dit)
    listed = isinstance(value, (list, tuple))
    items = list(value) if listed else [value]
    if not items:
        raise LoraEncoderInputError(f"{param}=[]: give at least one LoRA file (or None for no LoRA-Encoder).")
    # The DiT's layers when there is one (a LoRA only on img_in is then "missing every site", not "not FLUX"); they
    # include the encoder's sites (check_encoder_fits).
    shapes = dit if dit is not None else {s.layer: (s.out_features, s.in_features) for s in encoder.sites}
    loras, problems = [], []
    for i, item in enumerate(items):
        where = f"{param}[{i}]" if listed else param
        source = None
        try:
            source = _source(item)
            lora = read_lora_for(shapes, source)
        except (LoraError, CheckpointError, ModelFileError, TypeError, ValueError) as e:
            why = str(e).rstrip(".")  # the problems are joined with "; " and end with one period
            named = isinstance(source, (str, os.PathLike)) and str(source) not in why
            problems.append(f"{where}: {source}: {why}" if named else f"{where}: {why}")
            continue
        missing = [s.layer for s in encoder.sites if s.layer not in lora.layers]
        if missing:
            more = f", ... ({len(missing) - _LISTED} more)" if len(missing) > _LISTED else ""
            problems.append(f"{where}: {lora.source or 'LoRA'} has LoRAs on {len(encoder.sites) - len(missing)} of the "
                            f"{len(encoder.sites)} layers the LoRA-Encoder reads; {len(missing)} missing: "
                            f"{', '.join(missing[:_LISTED])}{more}")
            continue
        loras.append(lora)
    if problems:
        raise LoraEncoderInputError(
            "LoRA-Encoder: " + "; ".join(problems) + ". The encoder reads every double-block and single-block layer "
            "(DiffSynth's full LoRA target list, kohya's full FLUX set): give LoRAs made for this model on all of them.")
    return loras


def check_encoder_fits(encoder, dit) -> None:
    """The encoder was made for this DiT: its tokens are the DiT's text width and its sites the DiT's layers."""
    if dit is None:
        return
    problems = site_mismatch(encoder.sites, dit_lora_sites(dit), "LoRA-Encoder")
    if encoder.params.embed_dim != dit.params.context_in_dim:
        problems.insert(0, f"its tokens are {encoder.params.embed_dim} wide but the DiT's text tokens "
                           f"{dit.params.context_in_dim}")
    if problems:
        raise LoraEncoderInputError("the LoRA-Encoder does not fit this DiT: " + "; ".join(problems)
                                    + ". Load the LoRA-Encoder made for this DiT.")


def _source(item):
    if isinstance(item, ModelConfig):
        paths = item.resolve()
        if isinstance(paths, list):
            raise ValueError(f"the ModelConfig names {len(paths)} files ({', '.join(paths[:3])}); name one LoRA file")
        return paths
    if isinstance(item, (str, os.PathLike, LoraFile)):
        return item
    raise TypeError(f"is a {type(item).__name__}; pass a LoRA file path, a ModelConfig or a lora_tools.LoraFile")


def encode_loras(encoder, loras: list[LoraFile]) -> torch.Tensor:
    """The tokens of each LoRA, one after the other: (1, len(loras) * S, E), computed in the encoder's compute place."""
    device, dtype = compute_place(encoder)
    tokens = []
    for lora in loras:
        factors = {}
        for site in encoder.sites:
            layer = lora.layers[site.layer]
            factors[site.layer] = (layer.down.to(device, dtype), (layer.up.float() * layer.scale).to(device, dtype))
        tokens.append(encoder(factors))
    return torch.cat(tokens, dim=1)


@dataclass
class LoraEncoderAdapter:
    """Appends `tokens` (1, n, E) to the positive branch's text tokens, with zero ids."""
    tokens: torch.Tensor
    name: str = "lora_encoder"

    def contribute(self, inputs: DiTInputs, call: DiTCall) -> Contribution | None:
        if call.branch != "positive":
            return None
        b, n = inputs.batch, self.tokens.shape[1]
        tokens = self.tokens.to(inputs.txt.device, inputs.txt.dtype).expand(b, -1, -1)
        return Contribution(source=self.name, txt=torch.cat((inputs.txt, tokens), dim=1),
                            txt_ids=torch.cat((inputs.txt_ids, text_ids(b, n, device=inputs.txt_ids.device,
                                                                         dtype=inputs.txt_ids.dtype)), dim=1))


def lora_encoder_adapter(encoder, loras: list, scale: float, dit) -> LoraEncoderAdapter:
    """An adapter appending the encoded LoRAs' tokens (times `scale`) to the positive branch's text."""
    check_encoder_fits(encoder, dit)
    return LoraEncoderAdapter(encode_loras(encoder, loras) * float(scale))
