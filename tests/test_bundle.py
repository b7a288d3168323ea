"""The model bundle: round trip, refusals, inference from images, decision rules."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mlcore import bundle as bundle_module
from mlcore.bundle import (
    BUNDLE_FILE,
    FORMAT,
    FORMAT_VERSION,
    BundleError,
    Classifier,
    Decision,
    ModelBundle,
    Preprocessing,
    UnreadableImage,
    ValThresholds,
    class_embeddings_of,
    load_bundle,
    read_image,
)
from mlcore.config import DataConfig, MLDecoderConfig, ModelConfig
from mlcore.data.dataset import build_transform
from mlcore.models import build_model_from_config

NAMES = ("cat", "dog", "bird", "fish")
SMALL_DECODER = MLDecoderConfig(embed_dim=32, ff_dim=64, num_heads=4)


def make_bundle(head="gap", size=32, **extra) -> tuple[ModelBundle, torch.nn.Module]:
    cfg = ModelConfig(backbone="test_resnet", head=head, ml_decoder=SMALL_DECODER)
    torch.manual_seed(0)
    model = build_model_from_config(cfg, len(NAMES)).eval()
    bundle = ModelBundle(
        model=cfg,
        class_names=NAMES,
        preprocessing=Preprocessing(image_size=size),
        state_dict=model.state_dict(),
        metadata={"best_epoch": 3},
        **extra,
    )
    return bundle, model


def png_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("head", ["gap", "ml_decoder"])
def test_round_trip_rebuilds_the_same_model(head, tmp_path):
    bundle, model = make_bundle(head)
    path = bundle.save(tmp_path / BUNDLE_FILE)
    loaded = load_bundle(path)
    assert loaded.class_names == NAMES and loaded.model == bundle.model
    assert loaded.preprocessing == bundle.preprocessing
    assert loaded.metadata == {"best_epoch": 3} and loaded.cpsd_version
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.build_model()(images), model(images))


def test_thresholds_round_trip_and_the_digest_names_the_computation(tmp_path):
    stored = ValThresholds(per_class=(0.3, 0.4, 0.5, 0.6), single=0.45)
    bundle, _ = make_bundle(thresholds=stored)
    loaded = load_bundle(bundle.save(tmp_path / "b.pt"))
    assert loaded.thresholds == stored and loaded.digest == bundle.digest
    assert len(bundle.digest) == 64
    # Metadata and thresholds describe the model; they do not change what it computes.
    relabelled = dataclasses.replace(bundle, metadata={"best_epoch": 9}, thresholds=None)
    assert relabelled.digest == bundle.digest
    weights = dict(bundle.state_dict)
    key = next(iter(weights))
    weights[key] = weights[key] + 1e-3
    assert dataclasses.replace(bundle, state_dict=weights).digest != bundle.digest
    assert dataclasses.replace(bundle, class_names=NAMES[::-1]).digest != bundle.digest
    with pytest.raises(BundleError, match="3 per-class thresholds for 4 classes"):
        make_bundle(thresholds=ValThresholds(per_class=(0.5,) * 3, single=0.5))


def test_pretrained_model_config_does_not_download_on_load(tmp_path, monkeypatch):
    bundle, _ = make_bundle()
    bundle = dataclasses.replace(bundle, model=dataclasses.replace(bundle.model, pretrained=True))
    path = bundle.save(tmp_path / "b.pt")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    load_bundle(path).build_model()  # would raise "could not load pretrained weights"


def test_preprocessing_is_the_validation_transform():
    image = Image.open(io.BytesIO(png_bytes(size=(50, 37))))
    ours = Preprocessing(image_size=32).transform()(image)
    validation = build_transform(DataConfig(image_size=32), train=False)(image)
    assert torch.equal(ours, validation)


def test_nothing_is_unpickled(tmp_path):
    """A bundle-shaped file carrying an arbitrary Python object is refused, not executed."""
    bundle, _ = make_bundle()
    payload = torch.load(bundle.save(tmp_path / "good.pt"), weights_only=True)
    payload["extra"] = Preprocessing(image_size=8)  # a class instance: needs the unpickler
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(BundleError, match="not a readable model bundle") as refused:
        load_bundle(tmp_path / "evil.pt")
    assert "weights_only" not in str(refused.value) and "\n" not in str(refused.value)


def test_random_bytes_are_one_line_without_the_unsafe_hint(tmp_path):
    """torch's own message spans lines and suggests weights_only=False; ours does neither."""
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BundleError) as refused:
        load_bundle(path)
    message = str(refused.value)
    assert message == (
        f"{path} is not a readable model bundle: corrupt, truncated, or not a file cpsd wrote "
        "(UnpicklingError)"
    )


def test_corrupt_foreign_and_future_files_are_clear_errors(tmp_path):
    bundle, model = make_bundle()
    good = bundle.save(tmp_path / "good.pt")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"truncated.pt is not a readable model bundle"):
        load_bundle(truncated)

    checkpoint = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "epoch": 0}, checkpoint)
    with pytest.raises(BundleError, match="a training checkpoint"):
        load_bundle(checkpoint)

    payload = torch.load(good, weights_only=True)
    header = json.loads(payload["header"])
    torch.save({**payload, "version": FORMAT_VERSION + 1}, tmp_path / "v2.pt")
    with pytest.raises(BundleError, match=r"format version 2 \(written by cpsd .*reads version 1"):
        load_bundle(tmp_path / "v2.pt")

    header["model"]["head"] = "rnn_of_the_future"
    header["cpsd_version"] = "9.9"
    future = {**payload, "header": json.dumps(header)}
    torch.save(future, tmp_path / "future.pt")
    with pytest.raises(BundleError, match=r"written by cpsd 9.9 .*cannot build.*model.head"):
        load_bundle(tmp_path / "future.pt")

    with pytest.raises(FileNotFoundError):
        load_bundle(tmp_path / "absent.pt")
    assert payload["format"] == FORMAT


def test_weights_that_do_not_fit_the_config(tmp_path):
    bundle, _ = make_bundle()
    wrong = dataclasses.replace(bundle, model=dataclasses.replace(bundle.model, head="ml_decoder"))
    with pytest.raises(BundleError, match="do not fit its model config"):
        load_bundle(wrong.save(tmp_path / "b.pt")).build_model()


def test_class_embeddings_are_stored_and_handed_to_the_factory(tmp_path, monkeypatch):
    """The generic field for word queries: found on the model, saved, passed back on build."""

    class WordQueries(torch.nn.Module):
        def __init__(self, embeddings):
            super().__init__()
            self.register_buffer("class_embeddings", embeddings)

    embeddings = torch.randn(len(NAMES), 6)
    holder = torch.nn.Sequential(torch.nn.Identity(), WordQueries(embeddings))
    assert torch.equal(class_embeddings_of(holder), embeddings)
    assert class_embeddings_of(torch.nn.Linear(2, 2)) is None

    bundle, _ = make_bundle(class_embeddings=embeddings)
    loaded = load_bundle(bundle.save(tmp_path / "b.pt"))
    assert torch.equal(loaded.class_embeddings, embeddings)

    seen = {}

    def factory(cfg, num_classes, **kwargs):
        seen.update(kwargs)
        return build_model_from_config(cfg, num_classes)

    monkeypatch.setattr(bundle_module, "build_model_from_config", factory)
    loaded.build_model()
    handed = seen["class_embeddings"]  # with the names, so a word-query head can be rebuilt
    assert handed.names == tuple(NAMES)
    assert torch.equal(torch.from_numpy(handed.vectors), embeddings)
    with pytest.raises(BundleError, match="class_embeddings must be"):
        make_bundle(class_embeddings=torch.randn(3, 6))


def test_read_image_reports_why(tmp_path):
    assert read_image(png_bytes()).size == (40, 30)
    (tmp_path / "text.png").write_text("hello")
    truncated = png_bytes(size=(64, 64))[:60]
    for source, reason in [
        (tmp_path / "absent.png", "no such file"),
        (tmp_path / "text.png", "not an image file"),
        (b"\x89PNG garbage", "not an image file"),
        (truncated, "cannot decode"),
    ]:
        with pytest.raises(UnreadableImage, match=reason):
            read_image(source)


def test_classifier_scores_every_readable_input_once(tmp_path):
    bundle, model = make_bundle()
    (tmp_path / "a.png").write_bytes(png_bytes((10, 200, 10)))
    sources = [png_bytes(), b"junk", str(tmp_path / "a.png"), str(tmp_path / "nope.jpg")]
    classifier = Classifier(bundle, "cpu")
    batches = list(classifier.iter_scores(sources, batch_size=3))
    scored = [i for b in batches for i in b.indices]
    failed = [i for b in batches for i, _ in b.failures]
    assert sorted(scored + failed) == [0, 1, 2, 3] and failed == [1, 3]
    first = next(b for b in batches if 0 in b.indices)
    expected = torch.sigmoid(
        model(classifier.transform(read_image(sources[0])).unsqueeze(0))
    ).detach()
    assert np.allclose(first.scores[first.indices.index(0)], expected.numpy()[0], atol=1e-6)
    assert all(b.scores.shape == (len(b.indices), len(NAMES)) for b in batches)


def test_decision_rules():
    scores = np.array([[0.9, 0.2, 0.6, 0.55], [0.1, 0.3, 0.2, 0.05]])
    assert [list(r) for r in Decision(0.5).select(scores)] == [[0, 2, 3], []]
    per_class = Decision(np.array([0.95, 0.1, 0.6, 0.9]))
    assert [list(r) for r in per_class.select(scores)] == [[2, 1], [1]]
    assert [list(r) for r in Decision(top_k=2).select(scores)] == [[0, 2], [1, 2]]
    with pytest.raises(ValueError, match="top_k"):
        Decision(top_k=0)
