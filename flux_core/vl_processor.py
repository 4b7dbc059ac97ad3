"""Loading a Qwen2.5-VL processor (tokenizer + image processor + chat template) from its folder.

Step1X-Edit and Nexus-Gen read their prompts and reference images through transformers' Qwen2.5-VL processor.
transformers 5 builds that processor with a video processor, which needs torchvision; without torchvision the
processor is built from its tokenizer, its image processor (transformers' PIL one) and its chat template alone.
Images and text then go through the same transformers code; only videos, which FLUX never uses, are refused.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def load_vl_processor(folder: str | Path, **image_kwargs):
    """transformers' processor of a Qwen2.5-VL folder (`AutoProcessor.from_pretrained(folder, **image_kwargs)`;
    image_kwargs such as min_pixels / max_pixels go to its image processor)."""
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(str(folder), **image_kwargs)
    except ImportError as e:
        if "torchvision" not in str(e).lower():
            raise
    logger.info("%s: torchvision is not installed, so transformers cannot build the processor's video part; "
                "loading its tokenizer and image processor only (images and text work as usual).", folder)
    return image_only_processor(folder, **image_kwargs)


def image_only_processor(folder: str | Path, **image_kwargs):
    """The folder's processor class (preprocessor_config.json's `processor_class`, Qwen2_5_VLProcessor by default)
    without a video processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    folder = Path(folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    processor_class = getattr(transformers, config.get("processor_class") or "Qwen2_5_VLProcessor")

    class ImageOnlyProcessor(processor_class):
        """The processor with no video processor (transformers' needs torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    image_processor = AutoImageProcessor.from_pretrained(str(folder), **image_kwargs)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=_chat_template(folder) or getattr(tokenizer, "chat_template", None))


def _chat_template(folder: Path) -> str | None:
    """The processor's chat template: chat_template.jinja, else chat_template.json's (transformers writes both)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None
