"""``build_model``: any timm backbone with a registered multi-label head.

timm is the backbone registry (``timm.create_model``, see ``mlcore.models.backbone``); the heads
are model families (``mlcore.models.family``), each registered by its own module: ``gap`` is
timm's own global-average-pool + linear classifier, ``ml_decoder`` replaces it with the
ML-Decoder head fed by the backbone's unpooled ``forward_features`` (a CNN map (B, C, H, W) or
ViT tokens), and ``rnn`` is the orderless LSTM decoder of the PLA paper
(``mlcore.models.orderless_rnn``).

A model is rebuilt from its ``ModelConfig``, its class count and its ``state_dict``; with word
queries the class embedding table and names are in the ``state_dict`` too
(:func:`word_query_table` reads them back before building).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mlcore.config import MLDecoderConfig, ModelConfig, RNNConfig
from mlcore.data.embeddings import ClassEmbeddings
from mlcore.models.family import family_of
from mlcore.models.ml_decoder import decode_names


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
        head: A registered head (``mlcore.models.family.FAMILIES``): ``gap``, ``ml_decoder``,
            ``rnn``, ...
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
    cfg = ModelConfig(
        backbone=backbone,
        backbone_args=dict(backbone_args or {}),
        head=head,
        pretrained=pretrained,
        pretrained_file=pretrained_file,
        drop_rate=drop_rate,
        ml_decoder=ml_decoder or MLDecoderConfig(),
        rnn=rnn or RNNConfig(),
    )
    return build_model_from_config(cfg, num_classes, class_embeddings)


def build_model_from_config(
    cfg: ModelConfig, num_classes: int, class_embeddings: ClassEmbeddings | None = None
) -> nn.Module:
    """The model of ``cfg``, built by its head's family (see :func:`build_model`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    family = family_of(cfg.head)
    if family.class_embeddings(cfg) != (class_embeddings is not None):
        raise ValueError(
            "class embeddings are needed by, and only by, model.ml_decoder.queries: word"
        )
    return family.build(cfg, num_classes, class_embeddings)


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
