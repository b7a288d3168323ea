"""Models: timm backbones with a registered head (``mlcore.models.family``).

Importing the package imports every built-in head's module, which registers its family:
``gap`` (``backbone``), ``ml_decoder`` and ``rnn`` (``orderless_rnn``).
"""

from mlcore.models.backbone import BackboneWithHead
from mlcore.models.factory import build_model, build_model_from_config, word_query_table
from mlcore.models.family import FAMILIES, ModelFamily, family_of, register_family
from mlcore.models.orderless_rnn import OrderlessRNN

__all__ = [
    "FAMILIES",
    "BackboneWithHead",
    "ModelFamily",
    "OrderlessRNN",
    "build_model",
    "build_model_from_config",
    "family_of",
    "register_family",
    "word_query_table",
]
