"""The orderless CNN-RNN: an image encoder and an LSTM label decoder with soft attention.

Yazici et al., "Orderless Recurrent Models for Multi-label Classification" (CVPR 2020), §3.1,
with the attention and gating of the authors' ``model.py`` (Show-Attend-Tell style). For an
image with spatial features ``a`` (B, N, D) (N cells of the encoder's map) and pooled vector
``f`` (B, D)::

    h₀ = W_h f,   c₀ = W_c f                                   (no nonlinearity)
    e_t,i = wᵀ ReLU(W_a dropout(a_i) + W_d h_{t−1})              attention scores (B, N)
    z_t = σ(W_β h_{t−1}) ⊙ Σ_i softmax(e_t)_i · dropout(a_i)     gated context (B, D)
    x_t = [E · l̂_{t−1}, z_t]                                    l̂₀ = <start>
    h_t, c_t = LSTM(x_t, h_{t−1}, c_{t−1})                       (the paper's Eq. 1)
    p_t = W_o dropout(h_t) + b_o                                 logits over C classes + <end>
    l̂_t = argmax p_t                                            (Eq. 2: free-running)

The vocabulary is the C classes (0..C−1), ``<end>`` = C, and ``<start>`` = C + 1 (an input
only: the classifier has C + 1 outputs). The decoder is free-running in training too: each step
is fed the previous step's argmax. It always runs ``max_steps + 1`` steps, so the alignment
sees every step's prediction and ``<end>`` fits after ``max_steps`` labels.

``forward`` depends on the mode:

* training: step logits (B, T, C + 1), T = max_steps + 1, for ``loss.name: orderless``;
* evaluation: (B, C) logits of per-class scores, ``logit(s_c)`` with ``s_c`` the highest
  probability class c gets at any step before the first ``<end>``. **This score is our
  extension**: the paper reports no mAP. Returning its logit means ``sigmoid(model(x))`` is the
  score, so code written for per-class-logit models (``mlcore.train.predict``, the pipeline's
  reports) works unchanged. The paper evaluates the predicted label *sets*
  (:meth:`OrderlessRNN.decode`, cut at the first ``<end>``); ``mlcore.orderless`` reports those.

The model is rebuilt from ``ModelConfig`` + the number of classes + its ``state_dict``; the
stage-1 encoder checkpoint is loaded only when training starts (:meth:`load_encoder`). The
module registers the ``rnn`` model family (``mlcore.models.family``): trained with
``loss.name: orderless``, scored on its decoded label sets, never a CPSD teacher.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from mlcore.config import ExperimentConfig, ModelConfig
from mlcore.data.embeddings import ClassEmbeddings
from mlcore.data.manifest import Manifest
from mlcore.losses.orderless import TeacherForcing
from mlcore.models.backbone import create_backbone
from mlcore.models.family import ModelFamily, TrainingParts, register_family
from mlcore.orderless import check_label_counts, evaluate_sequences, sequence_scores
from mlcore.train import Objective, forward_images

# logit(s) of a score s = 0 (a class never predicted before <end>) would be −inf.
_SCORE_EPS = 1e-6


class OrderlessRNN(nn.Module):
    """A timm encoder (map + pooled vector) and the attention LSTM decoder of the PLA paper.

    Args:
        encoder: A timm model without classifier (``num_classes=0``); its ``forward_features``
            gives a CNN map (B, D, H, W) or ViT tokens (B, N, D) and ``forward_head(...,
            pre_logits=True)`` the pooled vector (B, D).
        num_classes: C.
        embed_dim: Label embedding size.
        hidden_dim: LSTM hidden size.
        attention_dim: Attention width.
        dropout: On fed-back embeddings and on the LSTM output before the classifier.
        attention_dropout: On the spatial features inside the attention (per step).
        max_steps: Most labels per image; the decoder runs ``max_steps + 1`` steps.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        *,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.0,
        attention_dropout: float = 0.5,
        max_steps: int = 19,
    ):
        super().__init__()
        if num_classes < 1 or max_steps < 1:
            raise ValueError(
                f"num_classes and max_steps must be >= 1, got {num_classes}, {max_steps}"
            )
        width = encoder.num_features
        self.encoder = encoder
        self.num_classes = num_classes
        self.max_steps = max_steps
        self.end_token = num_classes
        self.start_token = num_classes + 1
        self.init_h = nn.Linear(width, hidden_dim)
        self.init_c = nn.Linear(width, hidden_dim)
        self.embedding = nn.Embedding(num_classes + 2, embed_dim)  # classes, <end>, <start>
        self.attend_features = nn.Linear(width, attention_dim)
        self.attend_hidden = nn.Linear(hidden_dim, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, width)
        self.lstm = nn.LSTMCell(embed_dim + width, hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes + 1)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = nn.Dropout(attention_dropout)

    @property
    def num_steps(self) -> int:
        """T, the decoder's steps: ``max_steps`` labels and the ``<end>`` after them."""
        return self.max_steps + 1

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial cells (B, N, D) and the pooled vector (B, D)."""
        features = self.encoder.forward_features(images)
        pooled = self.encoder.forward_head(features, pre_logits=True)
        cells = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        return cells, pooled

    def decode(
        self, images: torch.Tensor, teacher_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder for T steps.

        Args:
            images: (B, 3, H, W).
            teacher_tokens: (B, T) tokens to feed after each step instead of the step's argmax
                (teacher forcing, a training control); None: free-running (the paper).

        Returns:
            Step logits (B, T, C + 1) and the argmax tokens (B, T).
        """
        cells, pooled = self.encode(images)
        h, c = self.init_h(pooled), self.init_c(pooled)
        token = torch.full(
            (images.shape[0],), self.start_token, dtype=torch.long, device=images.device
        )
        step_logits, tokens = [], []
        for t in range(self.num_steps):
            dropped = self.attention_dropout(cells)  # a new mask every step, as the authors
            scores = self.attention_score(
                F.relu(self.attend_features(dropped) + self.attend_hidden(h).unsqueeze(1))
            ).squeeze(-1)  # (B, N)
            context = (dropped * scores.softmax(dim=1).unsqueeze(-1)).sum(dim=1)  # (B, D)
            context = torch.sigmoid(self.gate(h)) * context
            embedded = self.dropout(self.embedding(token))
            h, c = self.lstm(torch.cat([embedded, context], dim=1), (h, c))
            logits = self.classifier(self.dropout(h))  # (B, C + 1)
            predicted = logits.argmax(dim=-1)
            step_logits.append(logits)
            tokens.append(predicted)
            token = predicted if teacher_tokens is None else teacher_tokens[:, t]
        return torch.stack(step_logits, dim=1), torch.stack(tokens, dim=1)

    def forward(
        self, images: torch.Tensor, teacher_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Training: step logits (B, T, C + 1). Evaluation: score logits (B, C) (see module)."""
        logits, tokens = self.decode(images, teacher_tokens)
        if self.training:
            return logits
        scores = sequence_scores(logits.float().softmax(dim=-1), tokens)
        return torch.logit(scores, eps=_SCORE_EPS)

    def load_encoder(self, checkpoint: str | os.PathLike) -> None:
        """Initialise the encoder from a ``head: gap`` checkpoint of the same backbone.

        The checkpoint's classifier weights are dropped; every encoder weight must be present.

        Raises:
            FileNotFoundError: No such file.
            ValueError: The checkpoint is not of this backbone (names the missing or
                mismatching keys).
        """
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.encoder_checkpoint does not exist: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        own = self.encoder.state_dict()
        classifier = self.encoder.pretrained_cfg.get("classifier") or "fc"
        missing = sorted(set(own) - set(state))
        unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(classifier))
        wrong_shape = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"model.encoder_checkpoint {path} is not a checkpoint of this backbone "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"shape mismatch {wrong_shape[:5]})"
            )
        self.encoder.load_state_dict({k: state[k] for k in own})


# ---------------------------------------------------------------------------------------------
# The model family


def build(cfg: ModelConfig, num_classes: int, embeddings: ClassEmbeddings | None) -> nn.Module:
    encoder = create_backbone(cfg, num_classes=0)
    return OrderlessRNN(encoder, num_classes, **dataclasses.asdict(cfg.rnn))


def training(
    cfg: ExperimentConfig,
    manifest: Manifest,
    model: nn.Module,
    loss: nn.Module,
    objective: Objective,
) -> TrainingParts:
    """Label counts checked, the stage-1 encoder loaded; teacher forcing when configured.

    Raises:
        ManifestError: An image has more labels than ``model.rnn.max_steps``.
    """
    check_label_counts(manifest, [cfg.data.train_split, cfg.data.val_split], model.max_steps)
    if cfg.model.encoder_checkpoint is not None:
        model.load_encoder(cfg.model.encoder_checkpoint)
    forward = TeacherForcing(loss) if cfg.loss.settings.teacher_forcing else forward_images
    return TrainingParts(forward, objective)


register_family(
    ModelFamily(
        name="rnn",
        build=build,
        training=training,
        evaluate=evaluate_sequences,
        losses="sequences",
        distills=False,
    )
)
