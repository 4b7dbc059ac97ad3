"""Load / Apply InfiniteYou (FluxCore), Load Face Embedding (FluxCore) and the sampler's handling of InfuseNet
payloads, on tiny models: the same numbers as FluxImagePipeline's `infinityou_id_embedding` with InfuseNet given as a
ControlNet input (our own library, which tests/test_infiniteyou_parity.py checks against DiffSynth-Studio; here the
node layer is checked against it), the face photo path, the embedding files, VRAM placement and the errors.

insightface is an optional extra and is not installed here: the face photo path runs with a stand-in for
flux_core.face_embedding.FaceEmbedder (monkeypatched), except the test of the missing-package error, which uses the
real class."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flux_core import ControlNetInput
from flux_core.controlnet import ControlNetAdapter
from flux_core.model_config import ModelConfig
from flux_core.model_state import state_of
from flux_core.pipeline import FluxImagePipeline
from nodes import NODE_CLASS_MAPPINGS
from nodes.conditioning import FluxCoreTextEncode
from nodes.controlnet_nodes import CONTROLNETS_KEY, FluxCoreApplyControlNet, FluxCoreControlNetLoader
from nodes.handles import FACE_EMBEDDING_TYPE, INFINITEYOU_TYPE, FaceEmbedding
from nodes.infiniteyou_nodes import (FluxCoreApplyInfiniteYou, FluxCoreInfiniteYouLoader, FluxCoreLoadFaceEmbedding,
                                     InfiniteYouPayload)
from nodes.loaders import NodeInputError
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from tests.tiny_comfy import NAMES, load_node_models, make_models_dir
from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
from tests.tiny_ipadapter import face_embedding, instantx_state_dict, projector_state_dict, write_instantx, write_projector

H, W = 48, 64
INFUSENET, PROJECTOR = "infu_flux_v1.0/aes_stage2/InfuseNetModel", "infu_flux_v1.0/aes_stage2/image_proj_model.bin"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_infu")
    models_dir, _ = make_models_dir(tmp)
    folder = models_dir / "infinite_you"
    (folder / PROJECTOR).parent.mkdir(parents=True)
    write_projector(projector_state_dict(seed=9), folder / PROJECTOR)
    # Sharded, as published (two shards and their index): the loader lists the folder, not its shards.
    write_diffusers_controlnet(make_diffusers_controlnet(seed=10, num_layers=1, num_single_layers=1),
                               folder / INFUSENET, max_shard_size="60KB")
    write_diffusers_controlnet(make_diffusers_controlnet(seed=11, num_mode=10), folder / "union")
    write_diffusers_controlnet(make_diffusers_controlnet(seed=12, num_layers=1, num_single_layers=0),
                               models_dir / "controlnet" / "tiny-plain")
    write_projector(projector_state_dict(seed=13, output_dim=64), folder / "wide_proj.bin")
    write_instantx(instantx_state_dict(seed=14), folder / "ip-adapter.bin")
    embeddings = models_dir / "face_embeddings"
    embeddings.mkdir()
    np.save(embeddings / "face.npy", face_embedding(1).numpy())
    save_file({"embedding": face_embedding(1)}, str(embeddings / "face.safetensors"))
    save_file({"a": face_embedding(1), "b": face_embedding(2)}, str(embeddings / "two.safetensors"))
    np.save(embeddings / "short.npy", np.zeros(256, dtype=np.float32))
    np.save(embeddings / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    torch.save(face_embedding(1), embeddings / "face.pt")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    loaded["infu"], = FluxCoreInfiniteYouLoader().load(PROJECTOR, INFUSENET)
    loaded["plain"], = FluxCoreControlNetLoader().load("tiny-plain")
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(models_dir / "diffusers" / NAMES["diffusers"])),
        ModelConfig(path=str(folder / PROJECTOR)), ModelConfig(path=str(folder / INFUSENET)),
        ModelConfig(path=str(models_dir / "controlnet" / "tiny-plain"))])
    yield dict(dir=models_dir, pipe=pipe, **loaded)
    mp.undo()


def encode(models, text):
    return FluxCoreTextEncode().encode(models["te"], text, 3.5, t5_sequence_length=16)[0]


def picture(seed, size=(40, 30)):
    pil = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return pil, torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255)[None]


def embedding(seed=1):
    return FaceEmbedding(face_embedding(seed).reshape(1, 1, 512), f"seed {seed}")


def sample(models, positive, negative, steps=3, cfg=1.0, dit=None):
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    return FluxCoreSampler().sample(dit or models["dit"], positive, negative, latent, seed=3, steps=steps,
                                    cfg=cfg)[0]["samples"]


def pipeline_latent(models, embedding_vector, guidance=1.0, scale=1.0, control=None, steps=3, cfg=1.0, start=1.0,
                    end=0.0, extra_inputs=()):
    """The pipeline with InfuseNet (controlnet_id 0) as DiffSynth's example passes it, as a raw VAE latent."""
    item = ControlNetInput(controlnet_id=0, image=control or Image.new("RGB", (W, H)), scale=scale,
                           processor_id="None", start=start, end=end)
    with torch.no_grad():
        scaled = models["pipe"](
            prompt="a cat", negative_prompt="", cfg_scale=cfg, height=H, width=W, seed=3, num_inference_steps=steps,
            t5_sequence_length=16, output_type="latent", progress_bar_cmd=None, controlnet_inputs=[item, *extra_inputs],
            infinityou_id_embedding=embedding_vector, infinityou_guidance=guidance)
    return models["vae"].model.module.to_comfy_latent(scaled)


def apply(models, positive=None, negative=None, guidance=1.0, strength=1.0, start=0.0, end=1.0, **optional):
    positive = positive if positive is not None else encode(models, "a cat")
    negative = negative if negative is not None else encode(models, "")
    return FluxCoreApplyInfiniteYou().apply(positive, negative, models["infu"], models["vae"], guidance, strength,
                                            start, end, **optional)


# ---------------------------------------------------------------- contract
def test_the_nodes_are_registered_with_their_inputs_and_outputs():
    loader, applier = NODE_CLASS_MAPPINGS["FluxCoreInfiniteYouLoader"], NODE_CLASS_MAPPINGS["FluxCoreApplyInfiniteYou"]
    face = NODE_CLASS_MAPPINGS["FluxCoreLoadFaceEmbedding"]
    assert loader.RETURN_TYPES == (INFINITEYOU_TYPE,) and face.RETURN_TYPES == (FACE_EMBEDDING_TYPE,)
    assert list(loader.INPUT_TYPES()["required"]) == ["projector_name", "infusenet_name", "weight_dtype"]
    assert applier.RETURN_TYPES == ("CONDITIONING", "CONDITIONING")
    spec = applier.INPUT_TYPES()
    assert list(spec["required"]) == ["positive", "negative", "infiniteyou", "vae", "guidance", "strength",
                                      "start_percent", "end_percent"]
    assert {k: v[0] for k, v in spec["optional"].items()} == {"face_image": "IMAGE", "face_embedding":
                                                              FACE_EMBEDDING_TYPE, "control_image": "IMAGE"}
    for cls in (loader, applier, face):
        for group in cls.INPUT_TYPES().values():
            for name, (_, options) in group.items():
                assert options.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"


def test_the_loader_lists_the_sharded_infusenet_as_one_folder(models):
    choices = FluxCoreInfiniteYouLoader.INPUT_TYPES()["required"]["infusenet_name"][0]
    assert INFUSENET in choices and PROJECTOR in choices
    shards = sorted((models["dir"] / "infinite_you" / INFUSENET).glob("*-of-*.safetensors"))
    assert len(shards) >= 2   # sharded as published: picking one shard would load half a model, so none is offered
    assert not [c for c in choices if c.startswith(INFUSENET + "/")]


# ---------------------------------------------------------------- the same numbers as the pipeline
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_apply_infiniteyou_equals_the_pipelines_identity_through_infusenet(models, cfg):
    got = sample(models, *apply(models, guidance=2.5, strength=0.9, face_embedding=embedding(1)), cfg=cfg)
    expected = pipeline_latent(models, face_embedding(1), guidance=2.5, scale=0.9, cfg=cfg)
    # Measured 0 (the same float32 computations). Another face moves the latent by 0.19 to 0.20, guidance 1
    # instead of 2.5 by 5.6 to 6.7 (both checked below).
    assert (got - expected).abs().max().item() <= 1e-5
    other = pipeline_latent(models, face_embedding(2), guidance=2.5, scale=0.9, cfg=cfg)
    assert (got - other).abs().max().item() > 1e-4
    unguided = pipeline_latent(models, face_embedding(1), guidance=1.0, scale=0.9, cfg=cfg)
    assert (got - unguided).abs().max().item() > 1e-4


def test_a_control_image_is_infusenets_control_map(models):
    pil, image = picture(3)
    got = sample(models, *apply(models, face_embedding=embedding(1), control_image=image))
    expected = pipeline_latent(models, face_embedding(1), control=pil)
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0
    black = pipeline_latent(models, face_embedding(1))   # measured 1.58 away
    assert (got - black).abs().max().item() > 1e-4


def test_percents_are_infusenets_step_range(models):
    got = sample(models, *apply(models, start=0.5, end=1.0, face_embedding=embedding(1)))
    expected = pipeline_latent(models, face_embedding(1), start=0.5, end=0.0)
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0
    whole = pipeline_latent(models, face_embedding(1))   # measured 2.92 away
    assert (got - whole).abs().max().item() > 1e-4


def test_another_controlnet_of_the_run_keeps_the_prompt(models, monkeypatch):
    """In a graph each InfuseNet carries its own face; an Apply ControlNet beside it is not given the identity."""
    seen = {}
    original = ControlNetAdapter.contribute

    def contribute(self, inputs, call):
        seen[self.name] = self.identity
        return original(self, inputs, call)
    monkeypatch.setattr(ControlNetAdapter, "contribute", contribute)
    _, image = picture(4)
    positive, negative = FluxCoreApplyControlNet().apply(encode(models, "a cat"), encode(models, ""), models["plain"],
                                                         image, models["vae"], "none", 0.7, 0.0, 1.0)
    positive, negative = apply(models, positive, negative, face_embedding=embedding(1))
    assert [type(p).__name__ for p in positive[0][1][CONTROLNETS_KEY]] == ["ControlNetPayload", "InfiniteYouPayload"]
    sample(models, positive, negative, steps=1)
    (plain, plain_identity), (infuse, identity) = seen.items()
    assert "tiny-plain" in plain and plain_identity is None
    assert INFUSENET in infuse and identity is not None and identity.tokens.shape == (1, 4, 32)


def test_a_face_photo_goes_through_the_face_embedder(models, monkeypatch):
    from flux_core import face_embedding as face_module
    from nodes import infiniteyou_nodes
    photo, image = picture(5)
    made = []

    class StandIn:
        """flux_core.face_embedding.FaceEmbedder's interface; insightface is not installed here."""
        def __init__(self, root=None):
            made.append(root)

        def embed(self, pil):
            assert np.array_equal(np.asarray(pil), np.asarray(photo))
            return face_embedding(7)
    monkeypatch.setattr(face_module, "FaceEmbedder", StandIn)
    monkeypatch.setattr(infiniteyou_nodes, "_embedders", {})
    positive, negative = apply(models, face_image=image)
    apply(models, face_image=image)
    assert made == [str(models["dir"] / "insightface")]   # made once, looking in models/insightface
    got = sample(models, positive, negative)
    expected = pipeline_latent(models, face_embedding(7))
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0


def test_a_face_photo_without_insightface_is_the_face_embedders_error_at_the_node(models, monkeypatch):
    from nodes import infiniteyou_nodes
    monkeypatch.setattr(infiniteyou_nodes, "_embedders", {})
    _, image = picture(6)
    with pytest.raises(NodeInputError, match=r"(?s)FluxCoreApplyInfiniteYou, input 'face_image': .*insightface.*"
                                             r"connect a precomputed embedding \(Load Face Embedding"):
        apply(models, face_image=image)


def test_no_face_found_is_named_at_the_face_image(models, monkeypatch):
    from flux_core import face_embedding as face_module
    from nodes import infiniteyou_nodes

    class NoFace:
        def __init__(self, root=None):
            pass

        def embed(self, pil):
            raise face_module.NoFaceFoundError("no face found in the photo at detection sizes 640, 320, 160")
    monkeypatch.setattr(face_module, "FaceEmbedder", NoFace)
    monkeypatch.setattr(infiniteyou_nodes, "_embedders", {})
    _, image = picture(7)
    with pytest.raises(NodeInputError, match=r"input 'face_image': no face found"):
        apply(models, face_image=image)


# ---------------------------------------------------------------- face embedding files
@pytest.mark.parametrize("name", ["face.npy", "face.safetensors"])
def test_face_embedding_files_load_without_unpickling(models, name):
    loaded, = FluxCoreLoadFaceEmbedding().load(name)
    assert loaded.vector.shape == (1, 1, 512) and torch.equal(loaded.vector.flatten(), face_embedding(1))


@pytest.mark.parametrize("name,match", [
    ("two.safetensors", "holds 2 tensors"), ("short.npy", "512-d ArcFace embedding"),
    ("objects.npy", "not a plain numeric .npy array"), ("face.pt", "from .npy or .safetensors files"),
    ("missing.npy", "not found"), ("../face.npy", "no '..'"),
])
def test_bad_face_embedding_files_are_refused_by_input(models, name, match):
    with pytest.raises(NodeInputError, match=f"FluxCoreLoadFaceEmbedding, input 'embedding_name': .*{match}"):
        FluxCoreLoadFaceEmbedding().load(name)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("projector,infusenet,match", [
    ("ip-adapter.bin", INFUSENET, r"input 'projector_name': .*expected a InfiniteYou image projector, but it looks "
                                  r"like a FLUX IP-Adapter"),
    (PROJECTOR, "union", r"input 'infusenet_name': union is a union ControlNet .*not InfiniteYou's InfuseNet"),
    (PROJECTOR, "ip-adapter.bin", r"input 'infusenet_name': .*expected a FLUX ControlNet"),
    ("wide_proj.bin", INFUSENET, r"inputs 'projector_name' and 'infusenet_name': the projector makes 64-wide"),
])
def test_the_loader_refuses_a_wrong_file_in_a_slot(models, projector, infusenet, match):
    with pytest.raises(NodeInputError, match=f"FluxCoreInfiniteYouLoader, {match}"):
        FluxCoreInfiniteYouLoader().load(projector, infusenet)


def test_apply_names_every_problem_at_once(models):
    _, image = picture(8)
    with pytest.raises(NodeInputError) as e:
        apply(models, start=0.9, end=0.1)
    assert "connect exactly one" in str(e.value) and "input 'end_percent'" in str(e.value)
    with pytest.raises(NodeInputError, match="not both"):
        apply(models, face_image=image, face_embedding=embedding())
    with pytest.raises(NodeInputError, match=r"input 'face_image': expected one IMAGE \(1, H, W, 3\), got "
                                             r"\(2, 30, 40, 3\)"):
        apply(models, face_image=image.expand(2, -1, -1, -1))
    with pytest.raises(NodeInputError, match="input 'face_embedding': expected a face embedding"):
        apply(models, face_embedding=torch.zeros(512))


def test_strength_zero_adds_nothing_and_no_control_image_is_black(models):
    positive, negative = encode(models, "a cat"), encode(models, "")
    assert apply(models, positive, negative, strength=0.0, face_embedding=embedding()) == (positive, negative)
    out, _ = apply(models, positive, negative, face_embedding=embedding())
    payload, = out[0][1][CONTROLNETS_KEY]
    assert isinstance(payload, InfiniteYouPayload) and payload.image.abs().sum() == 0


# ---------------------------------------------------------------- memory
def test_the_projector_joins_the_offloaded_dits_vram_manager_and_infusenet_runs_as_a_controlnet(models,
                                                                                               monkeypatch):
    from flux_core.vram import SimulatedDevice, VRAMManager
    from nodes import vram_nodes
    from nodes.loaders import FluxCoreDiTLoader
    from nodes.vram_nodes import FluxCoreVRAMOptions
    dit = FluxCoreDiTLoader().load(NAMES["dit"])[0]
    infu, = FluxCoreInfiniteYouLoader().load(PROJECTOR, INFUSENET)
    device = SimulatedDevice()
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: device)
    offloaded, = FluxCoreVRAMOptions().apply(dit, weight_dtype="default", offload=True, vram_limit=8.0)
    stages = []
    original = VRAMManager.load_models_to_device

    def load(self, names):
        names = list(names)
        stages.append((names, sorted(self.models)))
        original(self, names)
    monkeypatch.setattr(VRAMManager, "load_models_to_device", load)
    positive, negative = FluxCoreApplyInfiniteYou().apply(encode(models, "a cat"), encode(models, ""), infu,
                                                          models["vae"], 1.0, 1.0, 0.0, 1.0,
                                                          face_embedding=embedding(1))
    out = sample(models, positive, negative, steps=2, dit=offloaded)
    assert (["image_proj_model.0"], ["image_proj_model.0"]) in stages       # its own moment, the DiT's budget
    assert (["dit", "controlnet.0"], ["controlnet.0", "dit"]) in stages     # InfuseNet: the ControlNet path
    manager = state_of(dit.model.module).vram_placement[1]
    assert sorted(manager.models) == ["dit"] and manager.resident_bytes == 0 and device.live_bytes == 0
    assert state_of(infu.projector.module).compute is None
    expected = sample(models, *apply(models, face_embedding=embedding(1)), steps=2)
    assert (out - expected).abs().max().item() <= 1e-5   # measured 0: the same float32 weights
