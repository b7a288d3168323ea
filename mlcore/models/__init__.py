"""Models: timm backbones with a GAP or ML-Decoder head."""

from mlcore.models.factory import (
    BackboneWithHead,
    build_model,
    build_model_from_config,
    word_query_table,
)

__all__ = ["BackboneWithHead", "build_model", "build_model_from_config", "word_query_table"]
