"""The speed knobs (dmtc.speed, README "Speed"): precision=auto, channels_last, torch.compile, loader options,
and the host-sync-free metric and histogram updates, on this CPU machine (the CUDA paths are guarded by
torch.cuda.is_available() and measured by benchmarks/gpu_check.py)."""


from pathlib import Path

import probes
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS
from hydra import compose, initialize_config_dir
from torchmetrics.classification import MulticlassJaccardIndex

from dmtc.data.loading import loader_options
from dmtc.dmt.curriculum import ConfidenceHistogram
from dmtc.metrics import make_miou_metric
from dmtc.models import deeplab_v2
from dmtc.speed import channels_last_wanted, compile_options, prepare_model, resolve_precision, uses_cuda
from dmtc.tasks.train import train
from dmtc.trainer import build_trainer

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine resolves")


@CPU_ONLY
def test_auto_precision_is_32_true_on_a_cpu_and_other_values_pass_through():
    assert not uses_cuda("auto") and not uses_cuda("cpu")
    assert resolve_precision("auto") == "32-true"
    for value in ("32-true", "16-mixed", "bf16-mixed", 32):
        assert resolve_precision(value) == str(value)


def test_city_and_voc_default_to_auto_precision_and_the_command_line_wins():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        assert compose("train").trainer.precision == "32-true"  # the synthetic default keeps fp32
        for dataset in ("city", "voc"):
            assert compose("train", overrides=[f"dataset={dataset}"]).trainer.precision == "auto"
            fp32 = compose("train", overrides=[f"dataset={dataset}", "precision=32-true"])
            assert fp32.trainer.precision == "32-true"
        city, voc = compose("train", overrides=["dataset=city"]), compose("train", overrides=["dataset=voc"])
    assert city.trainer.benchmark is True and voc.trainer.benchmark is None  # fixed sizes vs full VOC images


@CPU_ONLY
def test_trainer_resolves_auto_precision_on_a_cpu(compose_cfg):
    cfg = compose_cfg(overrides=["precision=auto"])
    assert build_trainer(cfg).precision == "32-true"


def test_channels_last_setting():
    assert channels_last_wanted(True) and not channels_last_wanted("false")
    assert channels_last_wanted("auto") == channels_last_wanted(None) == uses_cuda()
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"mode": "reduce-overhead"}) == {"mode": "reduce-overhead"}


def test_channels_last_model_computes_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = deeplab_v2(4, backbone="resnet_tiny", projection_dim=8, projection_hidden=8)
    nhwc = deeplab_v2(4, backbone="resnet_tiny", projection_dim=8, projection_hidden=8)
    nhwc.load_state_dict(plain.state_dict())
    prepare_model(nhwc, channels_last=True)
    assert nhwc.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = torch.randn(2, 3, 48, 48), torch.randint(0, 4, (2, 48, 48))
    losses = []
    for model in (plain, nhwc):
        out = model(images)
        logits = F.interpolate(out["logits"], size=(48, 48), mode="bilinear")
        loss = F.cross_entropy(logits, labels) + out["features"].square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), nhwc.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name
    assert set(plain.state_dict()) == set(nhwc.state_dict())


def test_a_short_run_with_compile_trains_validates_and_checkpoints(compose_cfg, tmp_path):
    """A real short run (smoke: tiny backbone, 4 steps, validation) with ``model.compile=true``: the models'
    forward passes are traced by torch.compile (inductor, a C++ build on a CPU: ~40 s the first time on a
    cold compile cache), and the checkpoint keeps the plain state-dict keys, so it evaluates anywhere."""
    probes.RECORDS.clear()
    cfg = compose_cfg(overrides=["model.compile=true", "split=1", "+callbacks.probe._target_=probes.CompileProbe"])
    results = train(cfg)
    assert results["steps"] == 4 and 0 <= results["miou"] <= 100
    (record,) = probes.RECORDS
    assert record["train"] and all(record["train"]) and record["val"] and all(record["val"])
    state = torch.load(results["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any("_orig_mod" in k for k in state)
    fresh = deeplab_v2(int(cfg.dataset.num_classes), backbone="resnet_tiny")
    fresh.load_state_dict({k[len("models.a."):]: v for k, v in state.items() if k.startswith("models.a.")})


def test_dmtc_trains_under_bf16_mixed_precision(compose_cfg):
    """DMTC end to end under autocast (bf16 autocast runs on CPUs too; 16-mixed is the same autocast path
    on CUDA): warm-up and phases with ReCo and the memory bank, whose prototypes and similarities must stay
    float32 (a bf16 prototype met a float32 query in one bmm and every AMP run of DMTC crashed)."""
    cfg = compose_cfg(overrides=["method=dmtc", "precision=bf16-mixed", "method.contrastive.bank_size=16"])
    results = train(cfg)
    assert [p["name"] for p in results["phases"]] == ["phase0_warmup", "phase1_r0.5", "phase2_r1"]
    for phase in results["phases"]:
        assert all(0 <= phase["val"][k]["miou"] <= 100 for k in ("a", "b", "ens"))
    metrics = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
    assert "train/a/contrastive" in metrics and "nan" not in metrics.lower()


def test_loader_options_pin_for_cuda_and_prefetch_only_with_workers():
    assert loader_options(0) == {"num_workers": 0, "pin_memory": torch.cuda.is_available()}
    opts = loader_options(3, prefetch_factor=4)
    assert opts["persistent_workers"] is True and opts["prefetch_factor"] == 4 and opts["num_workers"] == 3
    assert loader_options(2)["prefetch_factor"] == 2
    assert loader_options(2, persistent=False)["persistent_workers"] is False


def test_every_loader_of_a_run_gets_the_options(compose_cfg):
    from dmtc.data.build import build_datamodule

    cfg = compose_cfg(overrides=["dataset.num_workers=1", "dataset.prefetch_factor=3"])
    datamodule, _ = build_datamodule(cfg)
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        assert loader.prefetch_factor == 3 and loader.persistent_workers and loader.num_workers == 1
        assert loader.pin_memory == torch.cuda.is_available()


@pytest.mark.parametrize("classes", [3, 19])
def test_sync_free_metric_counts_what_torchmetrics_counts(classes):
    ours, reference = make_miou_metric(classes), MulticlassJaccardIndex(classes, ignore_index=255, average="macro")
    g = torch.Generator().manual_seed(classes)
    for _ in range(4):
        target = torch.randint(0, classes, (3, 21, 34), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.25] = 255
        preds = torch.randint(0, classes, target.shape, generator=g)
        ours.update(preds, target)
        reference.update(preds, target)
        scores = torch.randn(3, classes, 21, 34, generator=g)  # class scores: argmax over dim 1
        ours.update(scores, target)
        reference.update(scores.argmax(1), target)
    assert torch.equal(ours.confmat, reference.confmat) and ours.confmat.dtype == torch.int64
    assert torch.equal(ours.compute(), reference.compute())
    ours.reset()
    assert int(ours.confmat.sum()) == 0


def test_histogram_update_equals_a_bincount_and_moves_between_devices():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 6, (2, 30, 40), generator=g)  # -1: padding, 5: outside 5 classes
    scores = torch.rand(labels.shape, generator=g) * 30
    hist = ConfidenceHistogram(5, bins=64).to("cpu")
    hist.update(labels, scores)
    keep = (labels >= 0) & (labels < 5)
    bins = torch.bucketize(scores.float(), hist.edges[1:], right=True)
    expected = torch.bincount((labels * 64 + bins)[keep], minlength=5 * 64).view(5, 64)
    assert torch.equal(hist.counts, expected)
    assert hist.to("cpu") is hist and hist.counts.device.type == "cpu"


def test_histogram_of_codes_equals_the_histogram_of_their_decoded_scores():
    from dmtc.dmt.scores import CODE_MAX, decode_score, quantize_score

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 6, (3, 50, 60), generator=g)
    scores = torch.cat([torch.rand(4000, generator=g) * 1e-3, torch.rand(4000, generator=g) * 40,
                        torch.rand(1000, generator=g) * 2000]).view(labels.shape)  # past SCORE_MAX too
    code, score_q = quantize_score(scores)
    by_score, by_code = ConfidenceHistogram(5), ConfidenceHistogram(5)
    by_score.update(labels, score_q)
    by_code.update_codes(labels, code)
    assert torch.equal(by_score.counts, by_code.counts) and by_code.counts.sum() == ((labels >= 0) & (labels < 5)).sum()
    every = torch.arange(CODE_MAX + 1, dtype=torch.int32)  # each code's decoded score lands in its own bin
    one_class = ConfidenceHistogram(1)
    one_class.update(torch.zeros_like(every), decode_score(every))
    assert torch.equal(one_class.counts[0], torch.ones(CODE_MAX + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="one bin per code"):
        ConfidenceHistogram(5, bins=64).update_codes(labels, code)


def test_no_host_sync_in_the_metric_histogram_and_score_decoding():
    """Run the per-batch updates under CUDA's sync debug mode where a GPU exists (an error on any host
    synchronisation); on a CPU machine the same code runs and must give the same counts."""
    from dmtc.dmt.scores import decode_score

    device = "cuda" if torch.cuda.is_available() else "cpu"
    metric = make_miou_metric(4).to(device)
    hist = ConfidenceHistogram(4).to(device)
    target = torch.randint(0, 4, (2, 16, 16), device=device)
    preds = torch.randint(0, 4, (2, 16, 16), device=device)
    codes = torch.randint(0, 65536, (2, 16, 16), device=device)
    decode_score(codes)  # the table is copied to the device once, outside the checked region
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update(preds, target)
        hist.update(preds, decode_score(codes))
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert int(metric.confmat.sum()) == 2 * 16 * 16 == int(hist.counts.sum())


def test_build_trainer_leaves_cuda_flags_alone_on_a_cpu(compose_cfg):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the flags are set on purpose")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    build_trainer(compose_cfg(overrides=["cuda.tf32=false"]))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == before
