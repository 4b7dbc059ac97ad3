"""FluxCore as a ComfyUI custom node pack (clone into ComfyUI/custom_nodes/).

Outside ComfyUI this file imports as well (tests do), and registers nothing beyond the mappings.
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # make flux_core and lora_tools importable when the pack is not pip-installed
    sys.path.append(_here)  # appended: the pack's folder names never shadow ComfyUI's own modules

if __package__:  # as ComfyUI loads it: relative, since ComfyUI has a top-level module called `nodes` of its own
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module (pytest imports the checkout's __init__.py this way)
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
