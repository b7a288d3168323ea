import pytest
import timm
import torch

from mlcore.config import MLDecoderConfig
from mlcore.models import BackboneWithHead, build_model

SMALL_DECODER = MLDecoderConfig(embed_dim=32, ff_dim=64, num_heads=4)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit", "test_convnext"])
@pytest.mark.parametrize("head", ["gap", "ml_decoder"])
def test_heads_on_cnn_and_vit(backbone, head):
    model = build_model(backbone, 7, head, ml_decoder=SMALL_DECODER)
    size = 64 if backbone == "test_vit" else 32
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert isinstance(model, BackboneWithHead) == (head == "ml_decoder")


def test_unknown_backbone_and_head():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet_xyz'"):
        build_model("resnet_xyz", 3)
    with pytest.raises(ValueError, match="'mlp' is not one of the registered heads"):
        build_model("test_resnet", 3, "mlp")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("test_resnet", 0)


def test_pretrained_offline_is_a_clear_message(monkeypatch):
    # Offline mode makes the hub fail at once instead of after network time-outs.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="pretrained_file=PATH"):
        build_model("resnet18", 5, pretrained=True)


def test_pretrained_file_loads_local_weights(tmp_path):
    source = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model("test_resnet", 5, pretrained_file=str(path))
    loaded, original = model.state_dict(), source.state_dict()
    body = [k for k in original if not k.startswith("fc.")]
    assert body and all(torch.equal(loaded[k], original[k]) for k in body)
    assert model.get_classifier().out_features == 5  # classifier replaced, not loaded
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("test_resnet", 5, pretrained_file=str(tmp_path / "missing.pth"))
