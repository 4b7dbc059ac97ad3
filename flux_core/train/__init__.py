"""Training: LoRA or full fine-tuning of the FLUX DiT, or full training of a FLUX ControlNet (`--trainable_models
controlnet`), an IP-Adapter (`--trainable_models ipadapter`) or InfiniteYou (`--trainable_models
controlnet,image_proj_model`), with DiffSynth-Studio's command line; a DiT LoRA may be trained with these models'
inputs (`--extra_inputs controlnet_image[,controlnet_inpaint_mask|controlnet_processor_id]`, `ipadapter_images`,
`controlnet_image,infinityou_id_image|infinityou_id_embedding[,infinityou_guidance]`).

    accelerate launch -m flux_core.train --dataset_base_path data/example_image_dataset \\
        --dataset_metadata_path data/example_image_dataset/metadata.csv --max_pixels 1048576 \\
        --dataset_repeat 50 --model_id_with_origin_paths "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors,\\
    black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/,\\
    black-forest-labs/FLUX.1-dev:ae.safetensors" --learning_rate 1e-4 --num_epochs 5 \\
        --output_path ./models/train/FLUX.1-dev_lora --lora_base_model dit --lora_rank 32 \\
        --use_gradient_checkpointing --align_to_opensource_format

args.py (arguments), dataset.py (metadata, images, sizes), loss.py (the flow-matching objective),
trainable.py (peft LoRA / full DiT / ControlNet / IP-Adapter / InfiniteYou, saving), control.py (the ControlNet a run
feeds, its columns and control inputs), ipadapter.py (the IP-Adapter's reference images), infiniteyou.py (the faces:
embedding files, or photos embedded with insightface), checkpoint.py (atomic, verified resumable states), run_folder.py
(the output folder: writable, one run per folder, no stale temporary files), trainer.py (the loop; FP8 storage
of frozen models through flux_core.vram), progress.py (JSON events and the terminal progress bar), packages.py
(the `train` extra), validate.py (validate_lora / validate_full), cache.py (split training: --task data_process writes the rows'
encodings, --task sft:train trains from them without the VAE and text encoders).
"""
from .args import TrainError, build_parser, parse_args


def train(args):
    from .trainer import train as _train
    return _train(args)


__all__ = ["TrainError", "build_parser", "parse_args", "train"]
