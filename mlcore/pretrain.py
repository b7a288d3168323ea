"""Upstream pretraining on generated data: the offline stand-in for ImageNet weights.

The CPSD paper fine-tunes ImageNet-pretrained backbones; no machine here can download them. The
``pretrain`` section (``mlcore.config.PretrainConfig``) trains one plain model on generated
images of shape × colour classes disjoint from the downstream task's (``data.synth.class_offset``)
and exports its backbone weights, which every downstream model then loads through
``model.pretrained_file`` (timm drops the upstream classifier). The pipeline runs this as its
``pretrain`` stage, keyed by :func:`pretrain_fingerprint`; every model's key then follows the
exported file's bytes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from mlcore.config import CPSDConfig, ExperimentConfig, LossConfig, PretrainConfig, ZSLConfig
from mlcore.data.loading import open_dataset
from mlcore.experiment import training_fingerprint
from mlcore.models import build_model_from_config
from mlcore.train import load_checkpoint

BACKBONE_FILE = "backbone.pt"
"""The exported backbone weights in the pretrain stage's folder."""


def pretrain_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The upstream run: ``pretrain.synth`` data through ``cfg``'s transforms, ``cfg``'s
    backbone with a GAP head, the default ASL loss, ``cfg``'s training loop with the upstream
    epochs, lr and seed. Nothing of the downstream seed, loss or CPSD settings enters, so all
    seeds and variants share it."""
    p = cfg.pretrain
    data = dataclasses.replace(
        cfg.data,
        root=None,
        synth=p.synth,
        class_embeddings=None,
        class_aware_sampling=False,
        train_split="train",
        val_split="val",
        test_split="test",
        shift_split="test_shift",
    )
    model = dataclasses.replace(
        cfg.model, head="gap", pretrained=False, pretrained_file=None, encoder_checkpoint=None
    )
    train = dataclasses.replace(cfg.train, epochs=p.epochs, seed=p.seed, lr=p.lr or cfg.train.lr)
    return dataclasses.replace(
        cfg,
        data=data,
        model=model,
        loss=LossConfig(),
        train=train,
        cpsd=CPSDConfig(mode="baseline"),
        zsl=ZSLConfig(),
        pretrain=PretrainConfig(),
    )


def pretrain_fingerprint(cfg: ExperimentConfig) -> str:
    """The upstream run's training fingerprint; opens the upstream dataset (its own data)."""
    upstream = pretrain_config(cfg)
    return training_fingerprint(upstream, open_dataset(upstream.data, with_bytes=False))


def export_backbone(
    cfg: ExperimentConfig, checkpoint: str | os.PathLike, out_path: str | os.PathLike
) -> Path:
    """Write the selected upstream weights without the classifier, as a timm state dict.

    Args:
        cfg: The downstream config (its ``pretrain`` section says what was trained).
        checkpoint: The upstream run's ``best.pt``.
        out_path: Where the weights go (written atomically).
    """
    upstream = pretrain_config(cfg)
    model = build_model_from_config(upstream.model, cfg.pretrain.synth.num_classes)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    classifier = model.pretrained_cfg.get("classifier", "fc")
    state = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not name.startswith(f"{classifier}.")
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out


def with_pretrained(cfg: ExperimentConfig, backbone: str | os.PathLike) -> ExperimentConfig:
    """``cfg`` resolved: the upstream weights are its ``model.pretrained_file`` and the
    ``pretrain`` section is spent (disabled)."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, pretrained_file=str(backbone)),
        pretrain=dataclasses.replace(cfg.pretrain, enabled=False),
    )
