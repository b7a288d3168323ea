"""The orderless CNN-RNN model: shapes per mode, free-running decoding, scores, teacher forcing,
the stage-1 encoder checkpoint, rebuilding from config; and the loop's SWA object."""

import pytest
import torch
from torch import nn

from mlcore.averaging import StochasticAverage
from mlcore.config import ModelConfig, RNNConfig
from mlcore.losses.orderless import OrderlessLoss, TeacherForcing
from mlcore.models import OrderlessRNN, build_model, build_model_from_config
from mlcore.models.orderless_rnn import sequence_scores
from mlcore.train import Batch

NUM_CLASSES = 5
RNN = RNNConfig(embed_dim=8, hidden_dim=16, attention_dim=8, max_steps=3)


def _model(dropout: float = 0.0) -> OrderlessRNN:
    torch.manual_seed(0)
    rnn = RNNConfig(**{**RNN.__dict__, "dropout": dropout, "attention_dropout": dropout})
    return build_model("test_resnet", NUM_CLASSES, "rnn", rnn=rnn)


def test_shapes_in_train_and_eval_mode():
    model = _model()
    images = torch.randn(2, 3, 64, 64)
    assert model.train()(images).shape == (2, 4, NUM_CLASSES + 1)  # max_steps + 1 steps
    assert model.eval()(images).shape == (2, NUM_CLASSES)


def test_decoding_is_free_running_and_eval_scores_come_from_it():
    model = _model().eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, tokens = model.decode(images)
        # Feeding the argmax tokens explicitly reproduces the free-running run exactly.
        forced, _ = model.decode(images, teacher_tokens=tokens)
        scores = torch.sigmoid(model(images))
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(forced, logits)
    expected = sequence_scores(logits.softmax(-1), tokens)
    torch.testing.assert_close(scores, expected.clamp(1e-6, 1 - 1e-6), rtol=1e-4, atol=1e-6)


def test_sequence_scores_take_the_max_before_the_first_end():
    probs = torch.tensor(
        [
            [[0.6, 0.1, 0.3], [0.2, 0.7, 0.1], [0.9, 0.0, 0.1]],  # 0, 1, 0: no <end>
            [[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.1, 0.8, 0.1]],  # 0, <end>, 1 (not counted)
            [[0.1, 0.1, 0.8], [0.9, 0.1, 0.0], [0.9, 0.1, 0.0]],  # <end> first: nothing
        ],
        dtype=torch.float64,
    )  # 2 classes + <end>
    scores = sequence_scores(probs, probs.argmax(-1))
    assert scores.tolist() == [[0.9, 0.7], [0.6, 0.3], [0.0, 0.0]]


def test_teacher_forcing_feeds_the_fixed_order_sequence():
    model = _model().train()  # no dropout: the forward is deterministic in training mode
    loss = OrderlessLoss(NUM_CLASSES, "frequent", rank=torch.tensor([1, 0, 2, 3, 4]))
    images = torch.randn(1, 3, 64, 64)
    batch = Batch(images, torch.tensor([[1.0, 1, 0, 1, 0]]), None)
    out = TeacherForcing(loss)(model, batch)
    # Order 1, 0, 3, then <end> (5), fed after steps 0..3.
    expected = model(images, teacher_tokens=torch.tensor([[1, 0, 3, 5]]))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, model(images))  # free-running differs
    with pytest.raises(ValueError, match="fixed order"):
        TeacherForcing(OrderlessLoss(NUM_CLASSES, "pla"))


def test_encoder_from_a_stage_one_checkpoint_and_rebuild_from_config(tmp_path):
    torch.manual_seed(1)
    stage1 = build_model("test_resnet", NUM_CLASSES, "gap")
    torch.save({"model": stage1.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    model = _model()
    model.load_encoder(tmp_path / "best.pt")
    for name, weight in model.encoder.state_dict().items():
        assert torch.equal(weight, stage1.state_dict()[name]), name

    # Rebuilt from config + number of classes + weights, without the checkpoint file.
    (tmp_path / "best.pt").unlink()
    cfg = ModelConfig(
        backbone="test_resnet", head="rnn", rnn=RNN, encoder_checkpoint=str(tmp_path / "best.pt")
    )
    rebuilt = build_model_from_config(cfg, NUM_CLASSES)
    rebuilt.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), model.eval()(images))


def test_encoder_checkpoint_errors(tmp_path):
    model = _model()
    with pytest.raises(FileNotFoundError, match="encoder_checkpoint does not exist"):
        model.load_encoder(tmp_path / "missing.pt")
    other = build_model("test_efficientnet", NUM_CLASSES, "gap")
    torch.save({"model": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this backbone"):
        model.load_encoder(tmp_path / "other.pt")


def test_swa_averages_due_snapshots_and_refreshes_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    swa = StochasticAverage(model, start_epoch=1, every_steps=2)
    snapshots = []
    for epoch, step in [(0, 2), (1, 3), (1, 4), (2, 5), (2, 6)]:
        with torch.no_grad():
            model[0].weight.add_(torch.randn(2, 3))
        swa.update(model, epoch, step)
        if epoch >= 1 and step % 2 == 0:
            snapshots.append(model[0].weight.clone())
    assert swa.count == 2
    averaged_weight = torch.stack(snapshots).mean(0)
    data = [(torch.randn(8, 3), torch.zeros(8)) for _ in range(4)]
    refreshed = swa.refreshed(data, torch.device("cpu"))
    torch.testing.assert_close(refreshed[0].weight, averaged_weight)
    with torch.no_grad():
        outputs = torch.cat([refreshed[0](x) for x, _ in data])
    torch.testing.assert_close(refreshed[1].running_mean, outputs.mean(0), atol=1e-5, rtol=1e-5)
    assert StochasticAverage(model).refreshed(data, torch.device("cpu")) is None  # nothing yet


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
def test_any_timm_backbone_is_an_encoder(backbone):
    model = build_model(backbone, NUM_CLASSES, "rnn", rnn=RNN)
    images = torch.randn(2, 3, 64, 64)
    cells, pooled = model.encode(images)
    assert cells.ndim == 3 and cells.shape[-1] == pooled.shape[-1] == model.encoder.num_features
    model.train()(images).sum().backward()
    assert model.eval()(images).shape == (2, NUM_CLASSES)
