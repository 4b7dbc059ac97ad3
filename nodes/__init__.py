"""FluxCore's ComfyUI nodes: thin glue over flux_core. Each module exports its own mappings; they meet here."""
from . import (channel_nodes, conditioning, control_map_nodes, controlnet_nodes, eligen_nodes, infiniteyou_nodes,
               ipadapter_nodes, loaders, lora_model_nodes, lora_nodes, native_model, nexus_gen_nodes, sampler,
               step1x_nodes, train_nodes, vae_nodes, vram_nodes)

_MODULES = [loaders, lora_nodes, lora_model_nodes, conditioning, eligen_nodes, controlnet_nodes, control_map_nodes,
            ipadapter_nodes, channel_nodes, step1x_nodes, nexus_gen_nodes, infiniteyou_nodes, sampler, vae_nodes,
            vram_nodes, train_nodes, native_model]

NODE_CLASS_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_DISPLAY_NAME_MAPPINGS.items()}
