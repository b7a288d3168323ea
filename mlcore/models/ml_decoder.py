"""ML-Decoder: an attention-based classification head that scales to thousands of classes.

Ridnik et al., "ML-Decoder: Scalable and Versatile Classification Head" (WACV 2023), §2.3.

The backbone's last feature map ``E`` (a CNN map ``(B, C, H, W)`` or ViT tokens ``(B, L, C)``) is
flattened to ``L = H·W`` spatial tokens and projected to the decoder width ``D``::

    E' = ReLU(E W_e + b_e)                                   # (B, L, D)

``K`` group queries ``G_q ∈ R^{K×D}`` (fixed random values by default: the attention's own
query projection can map any fixed query to any learnt one, §2.3.2 (3)) pass through a
transformer-decoder layer *without* self-attention (Eq. 4)::

    cross-attn:   G_q1 ← MultiHeadAttn(G_q, E', E')          # (B, K, D)
    feed-forward: G_q2 ← FF(G_q1)                            # (B, K, D)
    group FC:     Logits ← Group-FC(G_q2)                    # (B, N)

Removing self-attention makes the head linear instead of quadratic in the number of queries, and
group decoding (``K < N``) makes the attention and feed-forward cost independent of ``N``.
The group fully-connected layer (Eq. 3) expands query ``k`` to ``g = ⌈N/K⌉`` logits with its own
matrix ``W_k ∈ R^{g×D}`` while pooling the embedding dimension::

    L_i = (W_k · Q_k)_j + b_i,   k = i div g,  j = i mod g,  i < N

The last ``K·g − N`` outputs are dropped. Residual, LayerNorm and dropout placement, the ReLU after
the token projection, the default widths and the initialisation follow the authors' code
(github.com/Alibaba-MIIL/ML_Decoder, ``src_files/ml_decoder/ml_decoder.py``).

**Word queries** (§2.3.3, zero-shot). Each class ``i`` has a fixed embedding ``e_i ∈ R^E`` (a
word vector of its name); one query per class (``K = N``) comes from one projection shared by
all classes, with the authors' ReLU, and the group FC shares one weight vector ``w ∈ R^D`` and
one bias ``b`` across queries (``W_k = W`` in Eq. 3, ``g = 1``)::

    q_i = ReLU(W_q ê_i + b_q),   ê_i = e_i / ‖e_i‖           # (N, D)
    L_i = w · Decoder(q_i, E') + b                            # (B, N)

No weight depends on the class index and queries do not interact (no self-attention), so the
head scores any number of classes in any order, classes never trained on included, and the
logit of a class does not depend on which other classes are scored with it. The unit
normalisation of ``ê_i`` is ours: it puts every embedding source on one scale, so the query
noise below means the same thing for GloVe, fastText or generated vectors.

Query augmentations (training only; magnitudes are ours, the paper's are in a missing appendix):
*query noise* adds ``n ~ N(0, (σ²/E)·I)`` to every ``ê_i`` (one draw per batch, ``‖n‖ ≈ σ``);
*random queries* append ``R`` random unit vectors as extra queries, so the head returns
``(B, N + R)`` logits whose last ``R`` columns are labelled positive ("random") by the
objective (:class:`RandomQueryTargets`).

The module registers the ``ml_decoder`` model family (``mlcore.models.family``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mlcore.config import ExperimentConfig, ModelConfig
from mlcore.data.embeddings import ClassEmbeddings
from mlcore.data.manifest import Manifest
from mlcore.models.backbone import BackboneWithHead, create_backbone
from mlcore.models.family import ModelFamily, TrainingParts, register_family
from mlcore.train import Batch, Objective, forward_images

__all__ = [
    "CrossAttentionDecoderLayer",
    "GroupFullyConnected",
    "MLDecoder",
    "RandomQueryTargets",
    "SharedFullyConnected",
    "decode_names",
]

QueryKind = Literal["learned", "fixed", "word"]


class CrossAttentionDecoderLayer(nn.Module):
    """A post-norm transformer-decoder layer whose self-attention block is removed (Eq. 4).

    Args:
        embed_dim: Token width ``D``.
        num_heads: Attention heads; must divide ``embed_dim``.
        ff_dim: Hidden width of the feed-forward block.
        dropout: Dropout on the residual branches, inside the feed-forward block and on the
            attention weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.query_dropout = nn.Dropout(dropout)
        self.norm_query = nn.LayerNorm(embed_dim)
        self.cross_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.attn_dropout = nn.Dropout(dropout)
        self.norm_attn = nn.LayerNorm(embed_dim)
        self.ff = nn.Sequential(
            nn.Linear(embed_dim, ff_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(ff_dim, embed_dim),
        )
        self.ff_dropout = nn.Dropout(dropout)
        self.norm_ff = nn.LayerNorm(embed_dim)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Attend from the queries to the spatial tokens, then apply the feed-forward block.

        Args:
            queries: ``(B, K, D)`` group queries.
            memory: ``(B, L, D)`` projected spatial tokens.

        Returns:
            ``(B, K, D)`` decoded queries.
        """
        # The authors keep the residual + LayerNorm of the removed self-attention block with the
        # queries themselves as the branch: at eval LayerNorm(2q) == LayerNorm(q) up to eps, in
        # training the dropout makes it a multiplicative noise on the queries.
        x = self.norm_query(queries + self.query_dropout(queries))  # (B, K, D)
        # need_weights=False lets PyTorch use the fused attention kernel; the weights are unused.
        attn, _ = self.cross_attn(x, memory, memory, need_weights=False)  # (B, K, D)
        x = self.norm_attn(x + self.attn_dropout(attn))
        return self.norm_ff(x + self.ff_dropout(self.ff(x)))  # (B, K, D)


class GroupFullyConnected(nn.Module):
    """Group fully-connected layer (Eq. 3): query ``k`` → ``g`` logits via its own matrix ``W_k``.

    All ``K`` products are one batched contraction, so no ``(B, K, D, g)`` intermediate and no
    per-query loop. Weights are Xavier-normal over the ``(K, D, g)`` tensor and the bias is zero,
    as in the authors' code.

    Args:
        num_classes: Number of output logits ``N``.
        num_groups: Number of group queries ``K``.
        embed_dim: Query width ``D``.
    """

    def __init__(self, num_classes: int, num_groups: int, embed_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.group_factor = math.ceil(num_classes / num_groups)
        self.weight = nn.Parameter(torch.empty(num_groups, embed_dim, self.group_factor))
        self.bias = nn.Parameter(torch.empty(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal weights (fan-in ``D·g``, fan-out ``K·g``) and zero bias."""
        nn.init.xavier_normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """Map decoded group queries to class logits.

        Args:
            queries: ``(B, K, D)`` decoded group queries.

        Returns:
            ``(B, N)`` logits; logit ``i`` comes from query ``i // g``, column ``i % g``.
        """
        logits = torch.einsum("bkd,kdg->bkg", queries, self.weight)  # (B, K, g)
        return logits.flatten(1)[:, : self.num_classes] + self.bias  # (B, N)


class SharedFullyConnected(nn.Module):
    """Group FC shared by all queries (§2.3.3, ``W_k = W``, ``g = 1``): ``L_i = w · Q_i + b``.

    One weight vector and one scalar bias, so the layer takes any number of queries. The weight
    is Xavier-normal over ``(D, 1)``, the bias zero, like :class:`GroupFullyConnected`.

    Args:
        embed_dim: Query width ``D``.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(embed_dim, 1))
        self.bias = nn.Parameter(torch.zeros(()))
        nn.init.xavier_normal_(self.weight)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` decoded queries → ``(B, N)`` logits."""
        return (queries @ self.weight).squeeze(-1) + self.bias  # (B, N)


def _encode_names(names: Sequence[str]) -> torch.Tensor:
    """Class names as a uint8 tensor (UTF-8, newline-separated) so they live in state_dict."""
    bad = [n for n in names if not n or "\n" in n]
    if bad:
        raise ValueError(f"class names must be non-empty single lines, got {bad[:5]!r}")
    return torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)


def decode_names(encoded: torch.Tensor) -> list[str]:
    """Inverse of the encoding of class names into the ``class_names_utf8`` buffer."""
    return bytes(encoded.tolist()).decode().split("\n")


class MLDecoder(nn.Module):
    """ML-Decoder classification head over a backbone's spatial feature map or token sequence.

    Args:
        num_classes: Number of classes ``N``.
        in_features: Channel width ``C`` of the backbone features.
        num_groups: Number of group queries ``K``; ``None`` means ``min(100, N)``, the authors'
            default. Values above ``N`` are clipped to ``N``.
        embed_dim: Decoder width ``D``.
        num_layers: Number of stacked cross-attention decoder layers.
        ff_dim: Hidden width of the feed-forward block.
        num_heads: Attention heads; must divide ``embed_dim``.
        dropout: Dropout inside the decoder layers.
        queries: ``fixed`` (default): random group queries stored as a buffer, so no
            optimiser or ``requires_grad_`` call can make them train; ``learned``: trained
            group queries; ``word``: one query per class from ``class_embeddings`` (module
            docstring); ``num_groups`` must then be None.
        query_noise: Word queries: norm of the per-batch query noise in training.
        random_queries: Word queries: extra random queries per training batch.
        class_embeddings: Word queries: ``(N, E)`` class embeddings, row ``i`` for class ``i``.
        class_names: Word queries: the ``N`` class names, stored with the embeddings.

    Example:
        >>> head = MLDecoder(num_classes=9600, in_features=2048)
        >>> head(torch.randn(2, 2048, 7, 7)).shape
        torch.Size([2, 9600])
        >>> vectors = torch.randn(3, 300)
        >>> word = MLDecoder(3, 2048, queries="word", class_embeddings=vectors,
        ...                  class_names=["cat", "dog", "traffic light"])
        >>> word.eval()(torch.randn(2, 2048, 7, 7)).shape
        torch.Size([2, 3])
    """

    queries: torch.Tensor
    class_embeddings: torch.Tensor
    class_names_utf8: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        *,
        num_groups: int | None = None,
        embed_dim: int = 768,
        num_layers: int = 1,
        ff_dim: int = 2048,
        num_heads: int = 8,
        dropout: float = 0.1,
        queries: QueryKind = "fixed",
        query_noise: float = 0.0,
        random_queries: int = 0,
        class_embeddings: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if num_groups is not None and num_groups < 1:
            raise ValueError(f"num_groups must be positive, got {num_groups}")
        if queries not in ("learned", "fixed", "word"):
            raise ValueError(f"queries must be 'learned', 'fixed' or 'word', got {queries!r}")
        self.query_kind = queries
        self.token_proj = nn.Linear(in_features, embed_dim)
        self.layers = nn.ModuleList(
            CrossAttentionDecoderLayer(embed_dim, num_heads, ff_dim, dropout)
            for _ in range(num_layers)
        )
        if queries == "word":
            if num_groups is not None:
                raise ValueError("word queries decode one query per class; num_groups must be None")
            if class_embeddings is None or class_names is None:
                raise ValueError("word queries need class_embeddings and class_names")
            if query_noise < 0 or random_queries < 0:
                raise ValueError("query_noise and random_queries must be >= 0")
            self.query_noise = query_noise
            self.random_queries = random_queries
            self.set_class_embeddings(class_names, class_embeddings)
            if self.num_classes != num_classes:
                raise ValueError(
                    f"num_classes={num_classes} but class_embeddings has {self.num_classes} rows"
                )
            self.query_proj = nn.Linear(self.class_embeddings.shape[1], embed_dim)
            self.shared_fc = SharedFullyConnected(embed_dim)
            return
        if class_embeddings is not None or class_names is not None:
            raise ValueError(f"class_embeddings are for word queries, not {queries!r} queries")
        num_groups = min(100 if num_groups is None else num_groups, num_classes)
        # N(0, 1) like the nn.Embedding the authors draw the queries from.
        group_queries = torch.randn(num_groups, embed_dim)
        if queries == "learned":
            self.queries = nn.Parameter(group_queries)
        else:
            self.register_buffer("queries", group_queries)
        self.group_fc = GroupFullyConnected(num_classes, num_groups, embed_dim)

    @property
    def num_classes(self) -> int:
        """Classes scored: ``N`` (word queries: the rows of the current embedding table)."""
        if self.query_kind == "word":
            return self.class_embeddings.shape[0]
        return self.group_fc.num_classes

    @property
    def num_groups(self) -> int:
        """Queries decoded: ``K`` (word queries: one per class, ``N``)."""
        return self.num_classes if self.query_kind == "word" else self.queries.shape[0]

    @property
    def group_factor(self) -> int:
        """Logits produced per group query, ``g = ⌈N/K⌉`` (1 for word queries)."""
        return 1 if self.query_kind == "word" else self.group_fc.group_factor

    @property
    def class_names(self) -> list[str]:
        """Word queries: the names of the scored classes, in logit order."""
        if self.query_kind != "word":
            raise AttributeError(f"{self.query_kind!r} queries carry no class names")
        return decode_names(self.class_names_utf8)

    def set_class_embeddings(self, names: Sequence[str], vectors: torch.Tensor) -> None:
        """Score these classes from now on (word queries): zero-shot scoring of new classes.

        The table and the names are buffers, so they move with ``.to()`` and are saved in
        ``state_dict``. Nothing trained changes: the projection and the shared FC apply to any
        embedding of the trained width ``E``.

        Args:
            names: ``M`` class names, logit order.
            vectors: ``(M, E)`` embeddings, row ``i`` for ``names[i]``.

        Raises:
            ValueError: Not word queries, mismatched lengths or width, or non-finite values.
        """
        if self.query_kind != "word":
            raise ValueError(f"{self.query_kind!r} queries have no class embeddings to set")
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        names = list(names)
        if vectors.ndim != 2 or vectors.shape[0] != len(names) or not names:
            raise ValueError(
                f"need an (M, E) table for M = {len(names)} names, got {tuple(vectors.shape)}"
            )
        if hasattr(self, "query_proj") and vectors.shape[1] != self.query_proj.in_features:
            raise ValueError(
                f"embeddings have width {vectors.shape[1]}, the head was trained on "
                f"{self.query_proj.in_features}"
            )
        if not torch.isfinite(vectors).all() or (vectors.norm(dim=1) == 0).any():
            raise ValueError("class embeddings must be finite and non-zero")
        device = self.token_proj.weight.device
        self.register_buffer("class_embeddings", vectors.to(device))
        self.register_buffer("class_names_utf8", _encode_names(names).to(device))

    def _word_queries(self) -> torch.Tensor:
        """``(N, D)`` class queries, ``(N + R, D)`` with random queries in training."""
        embeddings = F.normalize(self.class_embeddings, dim=1)  # (N, E)
        if self.training:
            width = embeddings.shape[1]
            if self.query_noise > 0:
                noise = torch.randn_like(embeddings) * (self.query_noise / math.sqrt(width))
                embeddings = embeddings + noise
            if self.random_queries > 0:
                extra = torch.randn(
                    self.random_queries, width, device=embeddings.device, dtype=embeddings.dtype
                )
                embeddings = torch.cat([embeddings, F.normalize(extra, dim=1)])  # (N + R, E)
        return F.relu(self.query_proj(embeddings))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Compute class logits.

        Args:
            features: ``(B, C, H, W)`` CNN feature map or ``(B, L, C)`` token sequence (a ViT's
                class/register tokens are attended to like any other token).

        Returns:
            ``(B, N)`` logits; ``(B, N + R)`` for word queries with ``R`` random queries in
            training mode.
        """
        if features.ndim == 4:
            tokens = features.flatten(2).transpose(1, 2)  # (B, H·W, C)
        elif features.ndim == 3:
            tokens = features  # (B, L, C)
        else:
            raise ValueError(f"expected (B, C, H, W) or (B, L, C) features, got {features.shape}")
        memory = F.relu(self.token_proj(tokens))  # (B, L, D)
        queries = self._word_queries() if self.query_kind == "word" else self.queries
        # expand is a view: the K queries are shared by every image without a copy.
        x = queries.unsqueeze(0).expand(memory.shape[0], -1, -1)  # (B, K, D)
        for layer in self.layers:
            x = layer(x, memory)  # (B, K, D)
        if self.query_kind == "word":
            return self.shared_fc(x)  # (B, N) or (B, N + R)
        return self.group_fc(x)  # (B, N)


class RandomQueryTargets:
    """The objective side of the random-query augmentation: extra logits are positives.

    A word-query head in training mode appends ``R`` logits for random queries (``(B, N + R)``
    for ``(B, N)`` targets); the paper labels them positive ("random"). This pads the targets
    with ones and calls the wrapped objective.
    """

    def __init__(self, inner: Objective):
        self.inner = inner

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        targets = batch.targets  # (B, N)
        extra = logits.shape[1] - targets.shape[1]
        if extra < 0:
            raise ValueError(f"{logits.shape[1]} logits for {targets.shape[1]} target classes")
        if extra:
            ones = targets.new_ones(targets.shape[0], extra)
            batch = batch._replace(targets=torch.cat([targets, ones], dim=1))  # (B, N + R)
        return self.inner(logits, batch)


# ---------------------------------------------------------------------------------------------
# The model family


def word_queries(cfg: ModelConfig) -> bool:
    """Whether the config's ML-Decoder has one word query per class (class embeddings)."""
    return cfg.ml_decoder.queries == "word"


def build(cfg: ModelConfig, num_classes: int, embeddings: ClassEmbeddings | None) -> nn.Module:
    kwargs = dataclasses.asdict(cfg.ml_decoder)  # named as MLDecoder's arguments
    if embeddings is not None:
        kwargs.update(
            class_embeddings=torch.from_numpy(embeddings.vectors),
            class_names=embeddings.names,
        )
    body = create_backbone(cfg, num_classes=0)
    return BackboneWithHead(body, MLDecoder(num_classes, body.num_features, **kwargs))


def training(
    cfg: ExperimentConfig,
    manifest: Manifest,
    model: nn.Module,
    loss: nn.Module,
    objective: Objective,
) -> TrainingParts:
    """Random word queries are labelled positive; otherwise a plain classifier."""
    if word_queries(cfg.model) and cfg.model.ml_decoder.random_queries > 0:
        objective = RandomQueryTargets(objective)
    return TrainingParts(forward_images, objective)


register_family(
    ModelFamily(name="ml_decoder", build=build, training=training, class_embeddings=word_queries)
)
