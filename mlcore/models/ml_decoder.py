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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossAttentionDecoderLayer", "GroupFullyConnected", "MLDecoder"]


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
        learnable_queries: Train the group queries. By default they are fixed random values,
            stored as a buffer so no optimiser or ``requires_grad_`` call can make them train.

    Example:
        >>> head = MLDecoder(num_classes=9600, in_features=2048)
        >>> head(torch.randn(2, 2048, 7, 7)).shape
        torch.Size([2, 9600])
    """

    queries: torch.Tensor

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
        learnable_queries: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if num_groups is not None and num_groups < 1:
            raise ValueError(f"num_groups must be positive, got {num_groups}")
        num_groups = min(100 if num_groups is None else num_groups, num_classes)
        self.num_classes = num_classes
        self.num_groups = num_groups

        self.token_proj = nn.Linear(in_features, embed_dim)
        # N(0, 1) like the nn.Embedding the authors draw the queries from.
        queries = torch.randn(num_groups, embed_dim)
        if learnable_queries:
            self.queries = nn.Parameter(queries)
        else:
            self.register_buffer("queries", queries)
        self.layers = nn.ModuleList(
            CrossAttentionDecoderLayer(embed_dim, num_heads, ff_dim, dropout)
            for _ in range(num_layers)
        )
        self.group_fc = GroupFullyConnected(num_classes, num_groups, embed_dim)

    @property
    def group_factor(self) -> int:
        """Logits produced per group query, ``g = ⌈N/K⌉``."""
        return self.group_fc.group_factor

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Compute class logits.

        Args:
            features: ``(B, C, H, W)`` CNN feature map or ``(B, L, C)`` token sequence (a ViT's
                class/register tokens are attended to like any other token).

        Returns:
            ``(B, N)`` logits.
        """
        if features.ndim == 4:
            tokens = features.flatten(2).transpose(1, 2)  # (B, H·W, C)
        elif features.ndim == 3:
            tokens = features  # (B, L, C)
        else:
            raise ValueError(f"expected (B, C, H, W) or (B, L, C) features, got {features.shape}")
        memory = F.relu(self.token_proj(tokens))  # (B, L, D)
        # expand is a view: the K queries are shared by every image without a copy.
        x = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)  # (B, K, D)
        for layer in self.layers:
            x = layer(x, memory)  # (B, K, D)
        return self.group_fc(x)  # (B, N)
