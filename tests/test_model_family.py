"""A new head in one file: its module and one registration line, no other module touched.

The toy head (cosine classifier on a backbone's pooled features, with a learnt scale) is
registered here, then trained by ``train_classifier`` (one epoch of the tiny config), scored on
the held-out split by ``evaluate_model`` and exported to TorchScript with the parity check. Its
family's evaluator and training hook are the ones the loop uses (the ``val_toy_scale`` metric,
the hook's call), so nothing on the way asks for the head by name.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlcore.bundle import BUNDLE_FILE, load_bundle
from mlcore.configlib import ConfigError
from mlcore.cpsd import evaluate_model
from mlcore.data.loading import open_dataset
from mlcore.experiment import train_classifier
from mlcore.export import export_bundle
from mlcore.models import FAMILIES, ModelFamily, register_family
from mlcore.models.backbone import create_backbone
from mlcore.models.family import TrainingParts
from mlcore.train import Evaluation, evaluate_scores, forward_images
from workflows.config import config_path, load_config


class CosineHead(nn.Module):
    """Logits = scale · cos(pooled features, class weight): (B, 3, H, W) -> (B, C)."""

    def __init__(self, body: nn.Module, num_classes: int):
        super().__init__()
        self.body = body
        self.weight = nn.Parameter(torch.randn(num_classes, body.num_features) * 0.01)
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.body(images), dim=1)  # (B, F)
        return self.scale * features @ F.normalize(self.weight, dim=1).T  # (B, C)


def evaluate_toy(model, loader, device, amp=False) -> Evaluation:
    scored = evaluate_scores(model, loader, device, amp)
    return Evaluation(scored.scores, scored.targets, {**scored.metrics, "toy_scale": 0.0})


HOOK_CALLS = []


def toy_training(cfg, manifest, model, loss, objective) -> TrainingParts:
    HOOK_CALLS.append(cfg.model.head)
    return TrainingParts(forward_images, objective)


TOY = ModelFamily(
    name="toy",
    build=lambda cfg, num_classes, embeddings: CosineHead(
        create_backbone(cfg, num_classes=0), num_classes
    ),
    training=toy_training,
    evaluate=evaluate_toy,
    losses=("bce", "asl"),
)


@pytest.fixture
def toy_head():
    register_family(TOY)
    yield TOY
    del FAMILIES["toy"]


def _config(tmp_path, *overrides):
    return load_config(
        config_path("tiny"),
        ["model.head=toy", "train.epochs=1", f"storage_path={tmp_path / 'runs'}", *overrides],
    )


def test_a_registered_toy_head_trains_evaluates_and_exports(toy_head, tmp_path):
    cfg = _config(tmp_path)
    HOOK_CALLS.clear()
    dataset = open_dataset(cfg.data)
    result = train_classifier(cfg, dataset, tmp_path / "train", log=lambda _: None)
    assert HOOK_CALLS == ["toy"]
    assert result.history[0]["val_toy_scale"] == 0.0  # the family's evaluator selected
    bundle = load_bundle(tmp_path / "train" / BUNDLE_FILE)
    assert isinstance(bundle.build_model(), CosineHead)

    reports = evaluate_model(cfg, dataset, result.best_checkpoint, tmp_path / "train")
    assert set(reports["test"]) >= {"mAP", "toy_scale"}

    exported = export_bundle(bundle, "torchscript", tmp_path / "toy.pt")
    assert exported.max_abs_diff <= exported.atol


def test_config_names_the_registered_heads_and_the_losses_a_head_takes(toy_head, tmp_path):
    assert _config(tmp_path).model.head == "toy"
    with pytest.raises(ConfigError, match=r"'mlp' is not one of the registered heads: .*toy"):
        _config(tmp_path, "model.head=mlp")
    with pytest.raises(ConfigError, match=r"model\.head: toy and loss\.name: bce/asl go together"):
        _config(tmp_path, "loss.name=db")
