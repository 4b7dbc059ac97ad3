"""Does the demo draw what its prompt says? Generates one picture per held-out scene and measures each
(flux_core.demo.scenes.agrees), as the acceptance test (tests/test_demo_quality.py) asks it.

    pipe = FluxImagePipeline.from_demo()
    result = prompt_agreement(pipe)              # the held-out scenes, their prompts
    result.score                                 # share of pictures that agree (>= 0.9 expected)
    prompt_agreement(pipe, shift=1).score        # each picture made from the NEXT scene's prompt: low
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from . import HEIGHT, WIDTH
from .scenes import Scene, agrees, held_out_scenes

STEPS = 30


def test_prompt(scene: Scene, index: int) -> str:
    """The prompt a held-out scene is asked with: a centred shape named or not in turn."""
    return scene.prompt(say_center=index % 2 == 0)


@dataclass
class Agreement:
    scenes: list[Scene]        # what each picture is measured against
    prompts: list[str]         # what each picture was made from
    images: list[Image.Image]
    agreed: list[bool]

    @property
    def score(self) -> float:
        return sum(self.agreed) / len(self.agreed)


def prompt_agreement(pipe, scenes: list[Scene] | None = None, shift: int = 0, seed: int = 0,
                     num_inference_steps: int = STEPS, batch: int = 8) -> Agreement:
    """Picture i is made from the prompt of scene i + shift (0: its own) and measured against scene i, so a shift
    shows what the measurement gives when the prompt does not match (a model that ignored its prompt scores the
    same either way)."""
    scenes = list(scenes or held_out_scenes())
    prompts = [test_prompt(scenes[(i + shift) % len(scenes)], (i + shift) % len(scenes)) for i in range(len(scenes))]
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        images += pipe(prompt=chunk, seed=seed + start, num_inference_steps=num_inference_steps, height=HEIGHT,
                       width=WIDTH, progress_bar_cmd=None)
    return Agreement(scenes, prompts, images, [agrees(image, scene) for image, scene in zip(images, scenes)])
