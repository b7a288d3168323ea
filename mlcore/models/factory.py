"""``build_model``: any timm backbone with a multi-label head.

timm is the backbone registry (``timm.create_model``); the heads are ours: ``gap`` is timm's own
global-average-pool + linear classifier, ``ml_decoder`` replaces it with the ML-Decoder head
fed by the backbone's unpooled ``forward_features`` (a CNN map (B, C, H, W) or ViT tokens), and
``rnn`` is the orderless LSTM decoder of the PLA paper (``mlcore.models.orderless_rnn``).

A model is rebuilt from its ``ModelConfig``, its class count and its ``state_dict``; with word
queries the class embedding table and names are in the ``state_dict`` too
(:func:`word_query_table` reads them back before building).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mlcore.config import MLDecoderConfig, ModelConfig, RNNConfig
from mlcore.configlib import ConfigError
from mlcore.data.embeddings import ClassEmbeddings
from mlcore.models.ml_decoder import MLDecoder, decode_names
from mlcore.models.orderless_rnn import OrderlessRNN


class BackboneWithHead(nn.Module):
    """A timm backbone without its classifier, followed by a head on its feature map."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))


def _create_backbone(name: str, pretrained: bool, pretrained_file: str | None, **kwargs):
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())")
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained_file does not exist: {path}")
        # timm's loader maps the file onto the model and drops a mismatching classifier.
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    if not pretrained:
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


def build_model(
    backbone: str,
    num_classes: int,
    head: str = "gap",
    *,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    drop_rate: float = 0.0,
    ml_decoder: MLDecoderConfig | None = None,
    rnn: RNNConfig | None = None,
    class_embeddings: ClassEmbeddings | None = None,
    backbone_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A multi-label classifier returning logits (B, num_classes).

    ``head="rnn"`` returns these logits in eval mode only; in training mode it returns the
    decoder's step logits (see ``mlcore.models.orderless_rnn``).

    Args:
        backbone: timm model name.
        num_classes: Output logits.
        head: ``gap``, ``ml_decoder`` or ``rnn``.
        pretrained: Use timm's pretrained weights (needs the hub or its cache).
        pretrained_file: Local weights file; implies pretrained.
        drop_rate: Dropout before the GAP classifier.
        ml_decoder: ML-Decoder settings (defaults: the paper's).
        rnn: Orderless RNN decoder settings (defaults: the PLA paper's).
        class_embeddings: Names and vectors of the ``num_classes`` classes, in logit order;
            required by (and only used with) ML-Decoder word queries.
        backbone_args: Extra ``timm.create_model`` keyword arguments.

    Raises:
        ValueError: Unknown backbone or head, num_classes < 1, or class embeddings missing
            for word queries or given for another head.
        ConfigError: ``backbone_args`` the architecture does not take.
        RuntimeError: Pretrained weights requested but not reachable.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    settings = ml_decoder or MLDecoderConfig()
    word = head == "ml_decoder" and settings.queries == "word"
    if word != (class_embeddings is not None):
        raise ValueError(
            "class embeddings are needed by, and only by, model.ml_decoder.queries: word"
        )
    extra = dict(backbone_args or {})
    if head == "gap":
        return _create_backbone(
            backbone,
            pretrained,
            pretrained_file,
            num_classes=num_classes,
            drop_rate=drop_rate,
            **extra,
        )
    if head == "ml_decoder":
        kwargs = dataclasses.asdict(settings)  # named as MLDecoder's arguments
        if class_embeddings is not None:
            kwargs.update(
                class_embeddings=torch.from_numpy(class_embeddings.vectors),
                class_names=class_embeddings.names,
            )
        body = _create_backbone(backbone, pretrained, pretrained_file, num_classes=0, **extra)
        return BackboneWithHead(body, MLDecoder(num_classes, body.num_features, **kwargs))
    if head == "rnn":
        encoder = _create_backbone(backbone, pretrained, pretrained_file, num_classes=0, **extra)
        return OrderlessRNN(encoder, num_classes, **dataclasses.asdict(rnn or RNNConfig()))
    raise ValueError(f"unknown head {head!r}: choose 'gap', 'ml_decoder' or 'rnn'")


def build_model_from_config(
    cfg: ModelConfig, num_classes: int, class_embeddings: ClassEmbeddings | None = None
) -> nn.Module:
    """:func:`build_model` with the settings of ``cfg``."""
    return build_model(
        cfg.backbone,
        num_classes,
        cfg.head,
        pretrained=cfg.pretrained,
        pretrained_file=cfg.pretrained_file,
        drop_rate=cfg.drop_rate,
        ml_decoder=cfg.ml_decoder,
        rnn=cfg.rnn,
        class_embeddings=class_embeddings,
        backbone_args=cfg.backbone_args,
    )


def word_query_table(state_dict: dict[str, torch.Tensor]) -> ClassEmbeddings | None:
    """The class names and embeddings a word-query model's ``state_dict`` carries (None for
    other models).

    Rebuilding any model from its state: ``build_model_from_config(cfg, num_classes,
    word_query_table(state))``, then ``load_state_dict(state)``.
    """
    if "head.class_embeddings" not in state_dict:
        return None
    vectors = state_dict["head.class_embeddings"]
    names = decode_names(state_dict["head.class_names_utf8"])
    return ClassEmbeddings(tuple(names), vectors.detach().cpu().float().numpy())
