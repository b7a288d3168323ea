"""Models: timm backbones with a GAP or ML-Decoder head."""

from mlcore.models.factory import BackboneWithHead, build_model, build_model_from_config

__all__ = ["BackboneWithHead", "build_model", "build_model_from_config"]
