"""`python -m flux_core generate --demo` (on a demo-shaped folder; the shipped files in test_demo_shipped.py): the
demo's models, size and dtype unless flags say otherwise, refused beside flags that pick other models, a clear error
when the installation lacks the demo files; and the real model's offline errors point at `--demo`."""
from __future__ import annotations

import torch
from PIL import Image

from flux_core import demo, model_config
from flux_core.__main__ import DEMO_COMMAND, build_parser, build_pipeline, main
from flux_core.model_config import download_from_modelscope as real_download  # tests.offline replaces it
from flux_core.pipeline import FluxImagePipeline
from tests.offline import no_network  # noqa: F401 (autouse: no download in these tests)
from tests.tiny_demo import demo_folder, demo_here, recorded_t5_lengths  # noqa: F401 (fixtures)

FAST = ["--steps", "1", "--device", "cpu", "--seed", "0"]


def generate(tmp_path, *flags, name="demo.png") -> tuple[int, Image.Image | None]:
    out = tmp_path / name
    rc = main(["generate", "--demo", "--prompt", "a red circle on a blue background", "--output", str(out), *FAST,
               *flags])
    return rc, (Image.open(out) if out.exists() else None)


def test_demo_generates_at_its_size_in_float32(demo_here, tmp_path, capsys):
    rc, image = generate(tmp_path)
    assert rc == 0, capsys.readouterr().err
    assert image.size == (demo.WIDTH, demo.HEIGHT) == (128, 128)
    err = capsys.readouterr().err
    # what was loaded is printed in the command line's words, each from the demo folder
    assert f"--demo dit {demo_here / demo.FILES['dit']}: detected FLUX DiT" in err, err
    assert f"--demo vae {demo_here / demo.FILES['vae']}: detected FLUX VAE" in err, err
    args = build_parser().parse_args(["generate", "--demo", "--prompt", "x"])
    pipe = build_pipeline(args)
    assert pipe.torch_dtype == torch.float32 and pipe.default_size == (128, 128)


def test_demo_follows_size_dtype_and_t5_flags(demo_here, tmp_path, monkeypatch, capsys):
    rc, image = generate(tmp_path, "--height", "32", "--width", "48")
    assert rc == 0, capsys.readouterr().err
    assert image.size == (48, 32)
    args = build_parser().parse_args(["generate", "--demo", "--prompt", "x", "--dtype", "bfloat16"])
    assert build_pipeline(args).dit.img_in.weight.dtype == torch.bfloat16
    lengths = recorded_t5_lengths(monkeypatch)   # one positive branch per run at cfg 1
    assert generate(tmp_path, "--height", "32", "--width", "32")[0] == 0
    assert generate(tmp_path, "--height", "32", "--width", "32", "--t5-sequence-length", "16")[0] == 0
    assert lengths == [32, 16]   # left out: the demo tokenizer's 32


def test_demo_with_model_flags_is_refused_naming_them(demo_here, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a model loaded although the command line was refused")
    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", never)
    monkeypatch.setattr(FluxImagePipeline, "from_demo", never)
    rc, image = generate(tmp_path, "--dit", str(demo_here / demo.FILES["dit"]), "--model-id",
                         "black-forest-labs/FLUX.1-Krea-dev", "--tokenizer-2", str(tmp_path), "--local-model-path",
                         str(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and image is None
    assert ("--demo runs the bundled demo model, so it cannot be combined with --model-id, --local-model-path, --dit, "
            "--tokenizer-2 (which pick other model files)") in err, err
    rc, _ = generate(tmp_path, "--model-dir", str(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be combined with --model-dir" in err and "leave that flag out" in err, err


def test_t5_length_messages_say_leave_it_out(capsys):
    for value, said in (("0", "--t5-sequence-length 0 is below 1"), ("600", "--t5-sequence-length 600 is above 512")):
        assert main(["generate", "--prompt", "x", "--t5-sequence-length", value, "--skip-download"]) == 2
        err = capsys.readouterr().err
        assert said in err and "or leave it out for the T5 tokenizer's own length" in err and "None" not in err, err


def test_demo_files_missing_from_the_installation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "MODELS_DIR", tmp_path / "dropped")
    rc, image = generate(tmp_path, "--height", "50")
    err = capsys.readouterr().err
    assert rc == 2 and image is None
    assert "--demo: the bundled demo model's files are missing from this installation" in err, err
    assert all(path in err for path in demo.missing_files())
    assert "python -m flux_core.demo.build" in err and "--height 50" in err   # every problem at once
    assert "FluxImagePipeline" not in err


def test_real_model_missing_offline_points_at_demo(tmp_path, monkeypatch, capsys):
    rc = main(["generate", "--prompt", "a cat", "--output", str(tmp_path / "cat.png"), "--skip-download",
               "--local-model-path", str(tmp_path / "empty"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "--skip-download is set" in err, err
    assert f"try the bundled demo model: `{DEMO_COMMAND}`" in err, err
    assert DEMO_COMMAND == ('python -m flux_core generate --demo --prompt "a red circle on a blue background" '
                            '--output demo.png')
    assert "from_demo" not in err

    # `download` offline: ModelScope's own failure, wrapped by the real model_config.download_from_modelscope
    import modelscope

    def unreachable(*args, **kwargs):
        raise ConnectionError("network is unreachable")
    monkeypatch.setattr(model_config, "download_from_modelscope", real_download)
    monkeypatch.setattr(modelscope, "snapshot_download", unreachable)
    rc = main(["download", "--local-model-path", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and "network is unreachable" in err and f"`{DEMO_COMMAND}`" in err, err
