"""Tests for the ML-Decoder classification head (mlcore.models.ml_decoder)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from mlcore.data.embeddings import ClassEmbeddings
from mlcore.models.ml_decoder import GroupFullyConnected, MLDecoder

# Small widths keep every test well under a second on two CPU cores.
SMALL = {"embed_dim": 32, "ff_dim": 64, "num_heads": 4}


def _group_fc_loop_reference(queries: torch.Tensor, fc: GroupFullyConnected) -> torch.Tensor:
    """Eq. 3 written out literally: L_i = (W_k · Q_k)_j + b_i with k = i div g, j = i mod g."""
    batch, _, _ = queries.shape
    g = fc.group_factor
    out = torch.empty(batch, fc.num_classes, dtype=queries.dtype)
    for i in range(fc.num_classes):
        k, j = divmod(i, g)
        out[:, i] = queries[:, k, :] @ fc.weight[k, :, j] + fc.bias[i]
    return out


@pytest.mark.parametrize(
    ("num_classes", "num_groups", "expected_k", "expected_g"),
    [
        (10, 3, 3, 4),  # N not divisible by K: 12 outputs truncated to 10
        (9600, None, 100, 96),  # Open Images scale with the default K
        (9601, 100, 100, 97),
        (20, None, 20, 1),  # N < 100: one query per class
        (5, 8, 5, 1),  # K > N is clipped to N
    ],
)
def test_output_shape_and_group_sizes(
    num_classes: int, num_groups: int | None, expected_k: int, expected_g: int
) -> None:
    head = MLDecoder(num_classes, 16, num_groups=num_groups, **SMALL)
    assert head.num_groups == expected_k
    assert head.group_factor == expected_g == math.ceil(num_classes / expected_k)
    assert head.queries.shape == (expected_k, SMALL["embed_dim"])
    assert head(torch.randn(2, 16, 3, 2)).shape == (2, num_classes)


def test_token_and_map_inputs_agree() -> None:
    head = MLDecoder(7, 16, num_groups=3, **SMALL).eval()
    fmap = torch.randn(2, 16, 4, 5)  # (B, C, H, W)
    tokens = fmap.flatten(2).transpose(1, 2)  # (B, L, C)
    torch.testing.assert_close(head(fmap), head(tokens))
    with pytest.raises(ValueError, match="expected"):
        head(torch.randn(2, 16))


def test_group_fc_matches_per_query_loop() -> None:
    torch.manual_seed(0)
    fc = GroupFullyConnected(num_classes=10, num_groups=3, embed_dim=8).double()
    nn.init.normal_(fc.bias)  # the zero init would hide a bias/class misalignment
    queries = torch.randn(4, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(fc(queries), _group_fc_loop_reference(queries, fc))


def test_head_group_fc_matches_loop_inside_model() -> None:
    head = MLDecoder(10, 16, num_groups=3, **SMALL).eval()
    decoded: list[torch.Tensor] = []
    head.group_fc.register_forward_hook(lambda _m, args, _out: decoded.append(args[0]))
    logits = head(torch.randn(2, 16, 3, 3))
    torch.testing.assert_close(logits, _group_fc_loop_reference(decoded[0], head.group_fc))


def test_group_fc_init_follows_authors() -> None:
    torch.manual_seed(0)
    fc = GroupFullyConnected(num_classes=9600, num_groups=100, embed_dim=768)
    assert torch.count_nonzero(fc.bias) == 0
    # Xavier-normal over (K, D, g): fan_in = D·g, fan_out = K·g.
    expected_std = math.sqrt(2.0 / (768 * 96 + 100 * 96))
    assert fc.weight.std().item() == pytest.approx(expected_std, rel=0.01)


def test_queries_fixed_by_default() -> None:
    head = MLDecoder(12, 16, num_groups=4, **SMALL)
    assert "queries" in dict(head.named_buffers())
    assert "queries" not in dict(head.named_parameters())
    head.requires_grad_(True)  # e.g. un-freezing a model must not make the queries train
    assert not head.queries.requires_grad
    # Saved with the checkpoint, so a reloaded model sees the same random queries.
    assert "queries" in head.state_dict()


def test_queries_learnable_when_asked() -> None:
    head = MLDecoder(12, 16, num_groups=4, queries="learned", **SMALL)
    assert dict(head.named_parameters())["queries"].requires_grad
    head(torch.randn(2, 16, 2, 2)).sum().backward()
    assert head.queries.grad is not None
    assert head.queries.grad.abs().sum() > 0


def test_gradients_reach_projection_and_input() -> None:
    head = MLDecoder(12, 16, num_groups=4, **SMALL)
    features = torch.randn(2, 16, 3, 3, requires_grad=True)
    head(features).square().mean().backward()
    for name in ("weight", "bias"):
        grad = getattr(head.token_proj, name).grad
        assert grad is not None
        assert grad.abs().sum() > 0
    assert features.grad is not None
    assert features.grad.abs().sum() > 0


def test_no_self_attention() -> None:
    head = MLDecoder(12, 16, num_groups=4, num_layers=2, **SMALL)
    assert not any(isinstance(m, nn.TransformerDecoderLayer) for m in head.modules())
    attns = [m for m in head.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attns) == 2  # one cross-attention per layer, nothing else
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for attn in attns:
        attn.register_forward_hook(
            lambda _m, args, _out: calls.append((tuple(args[0].shape), tuple(args[1].shape)))
        )
    head(torch.randn(2, 16, 3, 5))
    # Every attention call takes K=4 queries over the L=15 spatial tokens.
    assert calls == [((2, 4, SMALL["embed_dim"]), (2, 15, SMALL["embed_dim"]))] * 2


def test_training_reduces_loss() -> None:
    torch.manual_seed(0)
    head = MLDecoder(10, 16, num_groups=3, **SMALL)
    features = torch.randn(8, 16, 3, 3)
    targets = (torch.rand(8, 10) < 0.3).float()
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = nn.functional.binary_cross_entropy_with_logits(head(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0]


def test_float64() -> None:
    head = MLDecoder(10, 16, num_groups=3, **SMALL).double()
    features = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    logits = head(features)
    assert logits.dtype == torch.float64
    logits.sum().backward()
    assert features.grad is not None
    assert features.grad.dtype == torch.float64
    # Double precision is what gradcheck needs; dropout off so the function is deterministic.
    head.eval()
    small = torch.randn(1, 16, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (small,))


@pytest.mark.parametrize("model_name", ["test_resnet", "test_vit"])
def test_timm_backbones(model_name: str) -> None:
    backbone = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
    head = MLDecoder(9600, backbone.num_features, **SMALL).eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.randn(2, 3, 160, 160))
        # test_resnet gives a (B, C, H, W) map, test_vit (B, 1 + H·W, C) tokens with the cls token.
        assert features.ndim == (4 if "resnet" in model_name else 3)
        logits = head(features)
    assert logits.shape == (2, 9600)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- word queries


def _word_head(num_classes: int = 6, width: int = 10, **kwargs) -> MLDecoder:
    torch.manual_seed(0)
    vectors = torch.randn(num_classes, width)
    names = [f"class {i}" for i in range(num_classes)]
    return MLDecoder(
        num_classes,
        16,
        queries="word",
        class_embeddings=vectors,
        class_names=names,
        **SMALL,
        **kwargs,
    )


def test_word_queries_share_one_fc_and_score_any_class_order() -> None:
    head = _word_head().eval()
    assert head.num_groups == head.num_classes == 6 and head.group_factor == 1
    # One weight vector and one bias for every query: nothing depends on the class index.
    assert head.shared_fc.weight.shape == (SMALL["embed_dim"], 1) and head.shared_fc.bias.ndim == 0
    assert not hasattr(head, "group_fc") and "queries" not in head.state_dict()
    features = torch.randn(3, 16, 2, 2)
    logits = head(features)
    table, names = head.class_embeddings.clone(), head.class_names
    order = [4, 0, 5]
    head.set_class_embeddings([names[i] for i in order], table[order])
    # A class's logit does not depend on which or how many other classes are scored.
    torch.testing.assert_close(head(features), logits[:, order])
    assert head.class_names == ["class 4", "class 0", "class 5"]


def test_word_queries_buffers_travel_in_state_dict_and_rebuild() -> None:
    from mlcore.config import MLDecoderConfig
    from mlcore.models import build_model, word_query_table

    cfg = MLDecoderConfig(queries="word", **SMALL)
    names = ["traffic light", "baseball bat", "dog"]
    table = ClassEmbeddings(tuple(names), np.random.default_rng(0).normal(size=(3, 7)).astype("f"))
    model = build_model("test_resnet", 3, "ml_decoder", ml_decoder=cfg, class_embeddings=table)
    state = model.state_dict()
    assert "head.class_embeddings" in state and "head.class_names_utf8" in state
    back = word_query_table(state)
    assert back.names == tuple(names)
    np.testing.assert_array_equal(back.vectors, table.vectors)
    # Rebuilt from config + class count + the table the state carries, then the state itself.
    again = build_model("test_resnet", 3, "ml_decoder", ml_decoder=cfg, class_embeddings=back)
    again.load_state_dict(state)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(images), model.eval()(images))
    with pytest.raises(ValueError, match="needed by, and only by"):
        build_model("test_resnet", 3, "ml_decoder", ml_decoder=cfg)


def test_query_augmentations_only_in_training() -> None:
    head = _word_head(query_noise=0.5, random_queries=3, dropout=0.0)
    features = torch.randn(2, 16, 2, 2)
    assert head.train()(features).shape == (2, 6 + 3)
    evaluated = head.eval()(features)
    assert evaluated.shape == (2, 6)
    torch.testing.assert_close(head(features), evaluated)  # no augmentation at evaluation
    # Without dropout, training-mode logits still change from call to call: the query noise.
    head.train()
    assert not torch.allclose(head(features)[:, :6], head(features)[:, :6])
    quiet = _word_head(query_noise=0.0, random_queries=0, dropout=0.0).train()
    torch.testing.assert_close(quiet(features), quiet(features))
    torch.testing.assert_close(quiet(features), quiet.eval()(features))


def test_word_query_errors() -> None:
    head = _word_head()
    with pytest.raises(ValueError, match="width 4, the head was trained on 10"):
        head.set_class_embeddings(["a"], torch.randn(1, 4))
    with pytest.raises(ValueError, match="need an \\(M, E\\) table for M = 2"):
        head.set_class_embeddings(["a", "b"], torch.randn(3, 10))
    with pytest.raises(ValueError, match="finite and non-zero"):
        head.set_class_embeddings(["a"], torch.zeros(1, 10))
    with pytest.raises(ValueError, match="single lines"):
        head.set_class_embeddings(["a\nb"], torch.randn(1, 10))
    with pytest.raises(ValueError, match="num_groups must be None"):
        MLDecoder(
            2,
            16,
            num_groups=2,
            queries="word",
            class_embeddings=torch.randn(2, 3),
            class_names=["a", "b"],
        )
    with pytest.raises(ValueError, match="need class_embeddings"):
        MLDecoder(2, 16, queries="word")
    with pytest.raises(ValueError, match="no class embeddings to set"):
        MLDecoder(2, 16, **SMALL).set_class_embeddings(["a"], torch.randn(1, 3))
