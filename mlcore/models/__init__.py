"""Models: timm backbones with a GAP, ML-Decoder or orderless RNN head."""

from mlcore.models.factory import (
    BackboneWithHead,
    build_model,
    build_model_from_config,
    word_query_table,
)
from mlcore.models.orderless_rnn import OrderlessRNN

__all__ = [
    "BackboneWithHead",
    "OrderlessRNN",
    "build_model",
    "build_model_from_config",
    "word_query_table",
]
