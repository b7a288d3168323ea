"""timm backbones, and the ``gap`` head: timm's own global-average-pool + linear classifier.

timm is the backbone registry (``timm.create_model``); :func:`create_backbone` adds our errors
(an unknown name, arguments the architecture does not take, unreachable pretrained weights) and
local weight files. Heads on the unpooled feature map wrap it in :class:`BackboneWithHead`.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from mlcore.config import ModelConfig
from mlcore.configlib import ConfigError
from mlcore.data.embeddings import ClassEmbeddings
from mlcore.models.family import ModelFamily, register_family


class BackboneWithHead(nn.Module):
    """A timm backbone without its classifier, followed by a head on its feature map."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))


def create_backbone(cfg: ModelConfig, **kwargs) -> nn.Module:
    """``timm.create_model(cfg.backbone, **cfg.backbone_args, **kwargs)`` with the configured
    pretrained weights (timm's, or ``cfg.pretrained_file``).

    Raises:
        ValueError: Unknown backbone.
        FileNotFoundError: ``pretrained_file`` does not exist.
        ConfigError: ``backbone_args`` the architecture does not take.
        RuntimeError: Pretrained weights requested but not reachable.
    """
    name, kwargs = cfg.backbone, {**cfg.backbone_args, **kwargs}
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())")
    if cfg.pretrained_file is not None:
        path = Path(cfg.pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained_file does not exist: {path}")
        # timm's loader maps the file onto the model and drops a mismatching classifier.
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    if not cfg.pretrained:
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:  # an argument the architecture does not take
            raise ConfigError(f"model.backbone_args not accepted by {name!r}: {err}") from err
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # hub/network errors come in many types; all mean the same here
        raise RuntimeError(
            f"could not load pretrained weights for {name!r} ({type(err).__name__}: {err}). "
            "Offline machines: download the weights elsewhere and set "
            "model.pretrained_file=PATH, or set model.pretrained=false."
        ) from err


def build_gap(cfg: ModelConfig, num_classes: int, embeddings: ClassEmbeddings | None) -> nn.Module:
    return create_backbone(cfg, num_classes=num_classes, drop_rate=cfg.drop_rate)


register_family(ModelFamily(name="gap", build=build_gap))
