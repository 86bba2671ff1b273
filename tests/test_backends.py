"""The ONNX Runtime backend gives the torch backend's answers, and its export is cached by weights hash."""

import numpy as np
import pytest
import torch
from conftest import encode, gradient
from PIL import Image

from diagnosis.backends import OnnxRunner, TorchRunner
from diagnosis.network import load_model
from diagnosis.pipeline import Pipeline

IMAGE = encode(Image.fromarray(gradient(300, 260, texture=True)), "PNG")


def test_onnx_pipeline_matches_torch_pipeline(fake_models, tmp_path):
    torch_result = Pipeline.load(fake_models, backend="torch").run(IMAGE).result
    onnx_pipeline = Pipeline.load(fake_models, backend="onnx", cache_dir=tmp_path)
    onnx_result = onnx_pipeline.run(IMAGE).result
    assert onnx_result.outcome == torch_result.outcome == "analysed"
    for ours, reference in zip(onnx_result.findings, torch_result.findings, strict=True):
        assert ours.label == reference.label
        assert ours.probability == pytest.approx(reference.probability, abs=1e-4)
    exported = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert len(exported) == 3 and all(len(name.split("-")[1]) == 16 for name in exported)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.onnx")}
    Pipeline.load(fake_models, backend="onnx", cache_dir=tmp_path)  # second start reuses the export
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.onnx")}


def test_export_leaves_the_live_network_untouched(fake_models, tmp_path):
    card, network = load_model(fake_models / "chest")
    batch = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    before = TorchRunner(network, torch.device("cpu"))(batch)
    onnx = OnnxRunner(network, card, tmp_path)(batch)
    after = TorchRunner(network, torch.device("cpu"))(batch)
    for a, b, c in zip(before, onnx, after, strict=True):
        assert np.abs(a - c).max() == 0
        assert np.abs(a - b).max() < 1e-4


def test_batch_equals_single_runs(fake_models):
    pipeline = Pipeline.load(fake_models)
    images = [IMAGE, b"not an image", encode(Image.fromarray(gradient(128, 128, texture=True)), "JPEG")]
    batched = pipeline.run_batch(images)
    for data, analysis in zip(images, batched, strict=True):
        single = pipeline.run(data)
        assert analysis.result.outcome == single.result.outcome
        assert [f.label for f in analysis.result.findings] == [f.label for f in single.result.findings]
        for a, b in zip(analysis.result.findings, single.result.findings, strict=True):
            assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert bool(analysis.overlays) == bool(single.overlays)


def test_flip_average_is_the_mean_over_the_image_and_its_mirror(tmp_path):
    from model_factory import CHEST_LABELS, make_model

    from diagnosis.heatmap import grad_cam

    make_model(tmp_path / "chest", role="abnormality", body_part="chest", labels=CHEST_LABELS,
               activation="sigmoid", biases=[0.0] * 14, flip_average=True, seed=3)
    card, network = load_model(tmp_path / "chest")
    assert card.flip_average and network.flip_average
    batch = np.random.default_rng(1).normal(size=(2, 1, 64, 64)).astype(np.float32)
    x = torch.from_numpy(batch)
    with torch.no_grad():
        plain = network.head(network.forward_features(x))
        mirrored = network.head(network.forward_features(x.flip(3)))
        features = network.forward_features(x)
    logits, maps = TorchRunner(network, torch.device("cpu"), channels_last=False)(batch)
    assert np.abs(logits - ((plain + mirrored) / 2).numpy()).max() < 1e-4
    assert np.abs(logits - plain.numpy()).max() > 1e-3  # the mirror really changes the answer
    assert np.abs(maps - features.numpy()).max() < 1e-4  # the heatmap stays the unflipped image's
    onnx_logits, onnx_maps = OnnxRunner(network, card, tmp_path / "cache")(batch)
    assert np.abs(onnx_logits - logits).max() < 1e-4 and np.abs(onnx_maps - maps).max() < 1e-4
    assert all(p.name.endswith("-flip.onnx") for p in (tmp_path / "cache").glob("*.onnx"))
    with_flip = grad_cam(network, x[:1], 2)
    network.flip_average = False
    assert np.abs(with_flip - grad_cam(network, x[:1], 2)).max() < 1e-4


def test_openvino_runner_matches_torch_and_onnx(fake_models, tmp_path):
    pytest.importorskip("openvino")
    from diagnosis.backends import OpenVinoRunner

    card, network = load_model(fake_models / "chest")
    batch = np.random.default_rng(2).normal(size=(3, 1, 64, 64)).astype(np.float32)
    reference = TorchRunner(network, torch.device("cpu"))(batch)
    onnx = OnnxRunner(network, card, tmp_path)(batch)
    runner = OpenVinoRunner(network, card, tmp_path, threads=1)
    assert runner.precision == "f32"
    for batch_size in (3, 1):  # dynamic batch: one compiled model serves every size
        ours = runner(batch[:batch_size])
        for a, b, c in zip(ours, reference, onnx, strict=True):
            assert a.shape == b[:batch_size].shape
            assert np.abs(a - b[:batch_size]).max() < 1e-3 and np.abs(a - c[:batch_size]).max() < 1e-3
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # reads the ONNX runner's cached export
    assert any((tmp_path / "openvino").iterdir())  # and caches its compiled blob beside it


def test_openvino_pipeline_matches_torch_pipeline(fake_models, tmp_path):
    pytest.importorskip("openvino")
    torch_result = Pipeline.load(fake_models, backend="torch").run(IMAGE).result
    result = Pipeline.load(fake_models, backend="openvino", cache_dir=tmp_path, threads=1).run(IMAGE).result
    assert result.outcome == torch_result.outcome == "analysed"
    for ours, reference in zip(result.findings, torch_result.findings, strict=True):
        assert ours.label == reference.label
        assert ours.probability == pytest.approx(reference.probability, abs=1e-4)


def test_openvino_requests_are_per_thread(fake_models, tmp_path):
    pytest.importorskip("openvino")
    import threading

    from diagnosis.backends import OpenVinoRunner

    card, network = load_model(fake_models / "gate")
    runner = OpenVinoRunner(network, card, tmp_path, threads=1)
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(2, 1, 64, 64)).astype(np.float32) for _ in range(4)]
    expected = [runner(b)[0] for b in batches]
    got: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        for _ in range(5):
            got[index] = runner(batches[index])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for index in range(4):
        assert np.array_equal(got[index], expected[index])


def test_bucketed_torch_runner_pads_and_drops_the_padding(fake_models):
    """The GPU worker's fixed batch sizes, run on the CPU: padded batches give the unpadded answers."""
    _, network = load_model(fake_models / "body_part")
    plain = TorchRunner(network, torch.device("cpu"), buckets=())
    bucketed = TorchRunner(network, torch.device("cpu"), buckets=(1, 4))
    assert [bucketed.padded_size(n) for n in (1, 2, 4, 5)] == [1, 4, 4, 5]
    bucketed.warm_up(1, 64)  # what a CUDA worker runs at start, per bucket
    batch = np.random.default_rng(5).normal(size=(7, 1, 64, 64)).astype(np.float32)
    expected = plain(batch)
    for n in (1, 3, 7):  # 3 is padded to 4; 7 runs as 4 + 3 (padded to 4)
        logits, features = bucketed(batch[:n])
        assert logits.shape == expected[0][:n].shape and features.shape == expected[1][:n].shape
        assert np.abs(logits - expected[0][:n]).max() < 1e-4
        assert np.abs(features - expected[1][:n]).max() < 1e-4


def test_bucketed_pipeline_batch_equals_single_runs(fake_models):
    pipeline = Pipeline.load(fake_models, backend="torch", batch_buckets=(1, 8))
    reference = Pipeline.load(fake_models, backend="torch")
    images = [IMAGE, encode(Image.fromarray(gradient(128, 128, texture=True)), "JPEG"), IMAGE]
    for ours, single in zip(pipeline.run_batch(images), (reference.run(d) for d in images), strict=True):
        assert ours.result.outcome == single.result.outcome
        for a, b in zip(ours.result.findings, single.result.findings, strict=True):
            assert a.label == b.label and a.probability == pytest.approx(b.probability, abs=1e-4)


def test_openvino_bf16_stays_close_to_torch(fake_models, tmp_path):
    """bf16 is an accuracy trade (docs/performance.md: pack-test metrics measured); here only that it runs and
    stays near the f32 answer on a small model."""
    ov = pytest.importorskip("openvino")
    from diagnosis.backends import make_runner

    card, network = load_model(fake_models / "chest")
    runner = make_runner("openvino-bf16", network, card, torch.device("cpu"), tmp_path, 1)
    # bf16 where the CPU has it natively; elsewhere f32 (emulated bf16 would be slower than f32).
    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert runner.precision == ("bf16" if native else "f32")
    batch = np.random.default_rng(6).normal(size=(2, 1, 64, 64)).astype(np.float32)
    logits, features = runner(batch)
    reference = TorchRunner(network, torch.device("cpu"))(batch)
    assert np.abs(logits - reference[0]).max() < 0.1 * max(1.0, np.abs(reference[0]).max())
    assert features.shape == reference[1].shape


def test_every_runner_returns_the_same_block3_map(fake_models, tmp_path):
    """The finer heatmap's block-3 map (issue #22): asked with ``block3=True``, every backend returns
    the same map as the network's own forward pass, of the image as sent (not the mirror image), and
    the same logits and final map as without it."""
    pytest.importorskip("openvino")
    from diagnosis.backends import OpenVinoRunner

    card, network = load_model(fake_models / "chest")
    network.flip_average = True  # the shipped chest card averages over the mirror image
    batch = np.random.default_rng(7).normal(size=(3, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        block3, _ = network.forward_block3(torch.from_numpy(batch))
    runners = {"torch": TorchRunner(network, torch.device("cpu")),
               "bucketed": TorchRunner(network, torch.device("cpu"), buckets=(1, 2)),
               "onnx": OnnxRunner(network, card, tmp_path), "openvino": OpenVinoRunner(network, card, tmp_path, 1)}
    for name, runner in runners.items():
        logits, features, maps = runner(batch, block3=True)
        plain = runner(batch)
        assert len(plain) == 2, name
        assert maps.shape == (3, 1024, 64 // 16, 64 // 16), name
        assert np.abs(maps - block3.numpy()).max() < 1e-3 * max(1.0, float(block3.abs().max())), name
        assert np.abs(logits - plain[0]).max() < 1e-4 and np.abs(features - plain[1]).max() < 1e-4, name
    assert not np.allclose(block3.numpy(), network.forward_block3(torch.from_numpy(batch).flip(3))[0].detach().numpy())
