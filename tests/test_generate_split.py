"""`python -m flux_core generate --prompts-file`: one image per prompt, image k named 0000k.png with seed --seed + k,
resumable; under `accelerate launch` each process takes its share and the images are byte for byte those of one
process (the bundled demo model: offline, seconds on a CPU)."""
from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flux_core.__main__ import _process_device, image_name, main
from flux_core.pipeline import FluxImagePipeline
from tests.offline import no_network  # noqa: F401 (autouse: no download in these tests)
from tests.tiny_demo import demo_folder, demo_here  # noqa: F401 (fixtures)
from tests.tiny_train import python, subprocess_env

FAST = ["--demo", "--steps", "1", "--device", "cpu", "--height", "32", "--width", "32", "--quiet"]
PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a yellow triangle",
           "a blue circle on a red background"]


def prompts_file(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_file(file: Path, out: Path, *flags) -> int:
    return main(["generate", "--prompts-file", str(file), "--output", str(out), *FAST, *flags])


def test_names_seeds_blank_lines_and_resume(demo_here, tmp_path, monkeypatch, capsys):
    # A BOM, a blank and a whitespace-only line (skipped: not prompts), spaces around a prompt (stripped).
    file = prompts_file(tmp_path / "p.txt", f"\ufeff{PROMPTS[0]}\n\n   \n  {PROMPTS[1]}  \r\n{PROMPTS[2]}")
    out = tmp_path / "out"
    assert run_file(file, out, "--seed", "7") == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert "process 0 of 1: wrote 3, skipped 0 already there" in printed
    assert f"3 of 3 images in {out} (1 process" in printed
    # image k is what `--prompt <line k> --seed 7+k` makes, byte for byte
    for k, prompt in enumerate(PROMPTS[:3]):
        single = tmp_path / f"single{k}.png"
        assert main(["generate", "--prompt", prompt, "--seed", str(7 + k), "--output", str(single), *FAST]) == 0
        assert single.read_bytes() == (out / image_name(k, 3)).read_bytes(), k
        assert f"saved {out / image_name(k, 3)} (seed {7 + k}; process 0 of 1)" in printed

    # resume: only the missing image is made, equal to the first run's; the others are not touched
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "00001.png").unlink()
    prompts_seen = []
    call = FluxImagePipeline.__call__

    def record(pipe, prompt="", **kwargs):
        prompts_seen.append((prompt, kwargs["seed"]))
        return call(pipe, prompt=prompt, **kwargs)
    monkeypatch.setattr(FluxImagePipeline, "__call__", record)
    assert run_file(file, out, "--seed", "7") == 0
    assert prompts_seen == [(PROMPTS[1], 8)]
    assert "wrote 1, skipped 2 already there" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # all there: nothing loads
    monkeypatch.setattr(FluxImagePipeline, "from_demo", classmethod(lambda *a, **k: pytest.fail("loaded")))
    assert run_file(file, out, "--seed", "7") == 0
    assert "wrote 0, skipped 3 already there" in capsys.readouterr().out


def test_seed_left_out_is_zero_and_the_folder_defaults_to_images(demo_here, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    file = prompts_file(tmp_path / "p.txt", PROMPTS[0] + "\n")
    assert main(["generate", "--prompts-file", str(file), *FAST]) == 0, capsys.readouterr().err
    assert main(["generate", "--prompt", PROMPTS[0], "--seed", "0", "--output", "zero.png", *FAST]) == 0
    assert (tmp_path / "images" / "00000.png").read_bytes() == (tmp_path / "zero.png").read_bytes()


def test_a_plain_install_without_accelerate_generates_a_prompts_file(demo_here, tmp_path, monkeypatch, capsys):
    """accelerate comes with the `train` extra only; one process needs none of it (a pip-installed package crashed
    here with ModuleNotFoundError)."""
    import sys
    monkeypatch.setitem(sys.modules, "accelerate", None)   # `import accelerate` now raises ImportError
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    file = prompts_file(tmp_path / "p.txt", "\n".join(PROMPTS[:2]))
    assert run_file(file, tmp_path / "out", "--seed", "3") == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png"]
    assert "process 0 of 1: wrote 2" in capsys.readouterr().out


def test_names_are_padded_to_sort_in_prompt_order():
    assert [image_name(k, 3) for k in range(3)] == ["00000.png", "00001.png", "00002.png"]
    assert image_name(7, 123456) == "000007.png" and image_name(123455, 123456) == "123455.png"


def test_bad_prompts_file_and_output_are_refused_by_flag_all_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(FluxImagePipeline, "from_demo", classmethod(lambda *a, **k: pytest.fail("loaded")))
    blank = prompts_file(tmp_path / "blank.txt", "\n  \n\n")
    a_file = prompts_file(tmp_path / "taken.png", "x")
    assert run_file(blank, a_file, "--steps", "0") == 2
    err = capsys.readouterr().err
    assert f"--prompts-file {blank}: holds no prompt (every line is blank)" in err, err
    assert f"--output {a_file}: is a file, and with --prompts-file --output names the folder" in err, err
    assert "--num-inference-steps 0 is below 1" in err   # every problem at once
    assert run_file(tmp_path / "missing.txt", tmp_path / "out") == 2
    assert f"--prompts-file {tmp_path / 'missing.txt'}: does not exist" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    assert run_file(latin, tmp_path / "out") == 2
    assert f"--prompts-file {latin}: is not UTF-8 text" in capsys.readouterr().err
    two = prompts_file(tmp_path / "two.txt", "a\nb\n")
    assert run_file(two, tmp_path / "out", "--seed", str(2**64 - 1)) == 2
    assert "image 1 of --prompts-file would get seed 18446744073709551616" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()   # the checks leave no folder behind
    for argv in (["generate", "--demo"], ["generate", "--demo", "--prompt", "x", "--prompts-file", str(two)]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "--prompt" in capsys.readouterr().err


def test_each_process_runs_on_its_own_gpu_unless_told_otherwise():
    two = SimpleNamespace(num_processes=2, device=torch.device("cuda", 1))
    one = SimpleNamespace(num_processes=1, device=torch.device("cuda", 0))
    assert _process_device(SimpleNamespace(device=None), two) == "cuda:1"
    assert _process_device(SimpleNamespace(device="cuda"), two) == "cuda:1"
    assert _process_device(SimpleNamespace(device="cuda:0"), two) == "cuda:0"   # an index is the user's choice
    assert _process_device(SimpleNamespace(device=None), one) is None            # the pipeline's own default
    cpu = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    assert _process_device(SimpleNamespace(device=None), cpu) is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved_lines(stdout: str) -> list[tuple[str, int, int]]:
    """(file name, seed, process) of every `saved` line."""
    return [(Path(m[1]).name, int(m[2]), int(m[3]))
            for m in re.finditer(r"^saved (.+) \(seed (\d+); process (\d+) of \d+\)$", stdout, re.M)]


@pytest.mark.slow
def test_two_processes_write_the_images_of_one(tmp_path):
    """The shipped demo model (a subprocess cannot be pointed at another folder), 4 prompts, once as one process and
    once as 2 processes through `accelerate launch` (--multi_gpu: on a machine without GPUs its plain launcher would
    start only one process; the two then share a gloo group for the final barrier)."""
    file = prompts_file(tmp_path / "prompts.txt", "\n".join(PROMPTS) + "\n")
    common = ["generate", "--prompts-file", str(file), *FAST, "--seed", "3"]
    launch = [python(), "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "flux_core", *common, "--output", str(tmp_path / "two")]
    two = subprocess.Popen(launch, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           encoding="utf-8")
    one = subprocess.run([python(), "-m", "flux_core", *common, "--output", str(tmp_path / "one")],
                         env=subprocess_env(), capture_output=True, text=True, encoding="utf-8")
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    names = [image_name(k, 4) for k in range(4)]
    for folder in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # each image written once, by the process whose share it is (k % 2), with seed 3 + k
    assert sorted(saved_lines(out)) == [(name, 3 + k, k % 2) for k, name in enumerate(names)], out
    assert sorted(saved_lines(one.stdout)) == [(name, 3 + k, 0) for k, name in enumerate(names)]
    assert "process 0 of 2: wrote 2, skipped 0" in out and "process 1 of 2: wrote 2, skipped 0" in out
    assert out.count(f"4 of 4 images in {tmp_path / 'two'} (2 processes") == 1, out   # the main process's line
