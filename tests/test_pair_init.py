"""DMT's pair initialisation (Feng et al., Pattern Recognition 2022, §4.1 and §4.3) and the phase schedule
from the dataset config: ``method.pair_init`` = seeds / inits / subsets.

End to end runs use real Hydra composition, the real pipeline and Lightning Trainer on the tiny synthetic
set; probe callbacks (instantiated from the config like any callback) record what each model is fed.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import expect_user_error

from dmtc.data.build import build_datamodule, build_layout, prepare_dataset
from dmtc.data.splits import dms_subset, dmt_split, split_ratio
from dmtc.data.transforms import stacks_inputs
from dmtc.dmt.pair import PairSpec, build_pair, pair_spec
from dmtc.errors import DMTCError
from dmtc.models import deeplab_v2
from dmtc.models.inits import INIT_INPUTS
from dmtc.tasks.train import train

DMT = ["method=dmt", "method.ratios=[1.0]", "method.phase.epochs=1"]
# end-to-end runs on an even smaller set: 24 training images (3 labeled at split 8, 21 unlabeled), 4 val
SMALL = ["dataset.generate.spec.num_train=24", "dataset.generate.spec.num_val=4"]
IMAGENET, CAFFE = INIT_INPUTS["imagenet"], INIT_INPUTS["coco"]

# ---------------------------------------------------------------------------------------------- probes

#: what the probes saw: filled by the callbacks below (instantiated by Hydra inside the pipeline)
SEEN: dict[str, list] = {}
_WHERE = ["outside"]


def _reset() -> None:
    SEEN.clear()
    SEEN.update({"inputs": [], "first": {}, "initial": {}, "warmup": [], "phase_labeled": [], "phase_sets": []})


class InputProbe(L.Callback):
    """Records every model input (where: warm-up fit, phase fit, or outside a fit = labeling), the first
    input per (where, model), and each model's weights when the warm-up starts."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        _WHERE[0] = f"fit:{pl_module.stage}"
        if pl_module.stage == "warmup":
            SEEN["initial"] = {k: {n: t.clone() for n, t in m.state_dict().items()}
                               for k, m in pl_module.models.items()}
        for key, model in pl_module.models.items():
            if not getattr(model, "_probe", False):
                model._probe = True
                model.register_forward_pre_hook(_recorder(key))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        _WHERE[0] = "outside"  # forward passes outside a Trainer: the next phase's labeling

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.state.fn == "validate":  # the pipeline's re-validation of the best weights
            _WHERE[0] = "validate"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.state.fn == "validate":
            _WHERE[0] = "outside"


def _recorder(key: str):
    def hook(module, args):
        images = args[0].detach()
        where = _WHERE[0] if module.training or _WHERE[0] == "outside" else f"{_WHERE[0]}:val"
        SEEN["inputs"].append((where, key, images.shape[1], float(images.abs().max())))
        SEEN["first"].setdefault((where, key), images.clone())

    return hook


class NameProbe(L.Callback):
    """Records the names in each warm-up batch per model, and the phases' labeled set and batch names."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if pl_module.stage == "mutual":
            loaders = getattr(trainer.train_dataloader, "iterables", trainer.train_dataloader)
            streams = [loaders] if "labeled" in loaders else [loaders[k] for k in ("a", "b")]
            for stream in streams:  # RepeatedDataset of the split
                SEEN["phase_sets"].append(sorted(stream["labeled"].dataset.dataset.names))
                SEEN.setdefault("phase_unlabeled", []).append(sorted(stream["unlabeled"].dataset.names))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if pl_module.stage == "warmup":
            per_model = "image" not in batch
            SEEN["warmup"].append({k: list((batch[k] if per_model else batch)["name"]) for k in ("a", "b")})
        else:
            streams = {"a": batch, "b": batch} if "labeled" in batch else batch
            SEEN.setdefault("phase_batches", []).append({k: (list(streams[k]["labeled"]["name"]),
                                                             list(streams[k]["unlabeled"]["name"]),
                                                             sorted(streams[k]["unlabeled"]))
                                                         for k in ("a", "b")})
            SEEN["phase_labeled"].extend(streams["a"]["labeled"]["name"])


def _raw_rgb(images: torch.Tensor, norm: dict) -> torch.Tensor:
    """Undo a normalisation: the 0–255 RGB image a normalised input was made from."""
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    raw = (images * std + mean) / norm["value_scale"]
    return raw.flip(1) if norm["bgr"] else raw


# ---------------------------------------------------------------------------------------------- config


def test_pair_and_phase_schedule_come_from_the_dataset(compose_cfg):
    cfg = compose_cfg(overrides=["method=dmt", "~debug"])  # synthetic: a seeds pair, the CPU-sized phase schedule
    p = cfg.method.phase
    assert cfg.method.pair_init == "seeds" and cfg.method.get("schedules") is None
    assert (p.epochs, p.lr, p.gamma1, p.gamma2, p.labeled_batch_size, p.unlabeled_batch_size) == (2, 0.01, 3, 3, 2, 6)
    assert list(cfg.method.ratios) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert pair_spec(cfg) == PairSpec("seeds", {"a": 0, "b": 1}, {"a": "none", "b": "none"}, None)
    # the command line wins over the dataset's values; the dataset file's values feed method.phase
    cfg = compose_cfg(overrides=["method=dmtc", "method.phase.epochs=4", "dataset.schedule.dmt_phase.lr=0.02",
                                 "+dataset.schedule.dmt_phase.ratios=[0.5,1.0]"])
    assert (cfg.method.phase.epochs, cfg.method.phase.lr, list(cfg.method.ratios)) == (4, 0.02, [0.5, 1.0])

    def voc(*extra):  # the protocol's ResNet-101 (debug=smoke's resnet_tiny falls back: below)
        return compose_cfg(overrides=["dataset=voc", "method=dmt", "~debug", *extra])

    cfg = voc("split=106")  # DMT VOC 1/106: both COCO, warmed up on the difference-maximized subsets
    assert cfg.method.pair_init == "subsets"
    assert pair_spec(cfg) == PairSpec("subsets", {"a": 0, "b": 1}, {"a": "coco", "b": "coco"},
                                      {"a": "106-l", "b": "106-r"})
    p = cfg.method.phase
    assert (p.epochs, p.lr, p.gamma1, p.gamma2, p.labeled_batch_size, p.unlabeled_batch_size) == (4, 0.001, 5, 5, 1, 7)
    cfg = voc("split=20")  # DMT VOC 1/20: A from COCO, B from ImageNet
    assert pair_spec(cfg) == PairSpec("inits", {"a": 0, "b": 1}, {"a": "coco", "b": "imagenet"}, None)
    cfg = voc("split=20", "method.pair_init=seeds", "method.phase.gamma1=2")
    # seeds: both from backbone.init (resnet101: imagenet)
    assert pair_spec(cfg).inits == {"a": "imagenet", "b": "imagenet"} and cfg.method.phase.gamma1 == 2
    cfg = compose_cfg(overrides=["dataset=city", "method=dmt", "split=8", "~debug"])
    assert pair_spec(cfg).mode == "inits" and pair_spec(cfg).inits == {"a": "coco", "b": "imagenet"}
    # debug=smoke's resnet_tiny has no weight files: the pair becomes two seeds of random init, subsets stay
    cfg = compose_cfg(overrides=["dataset=city", "method=dmt", "split=8"])
    assert pair_spec(cfg) == PairSpec("seeds", {"a": 0, "b": 1}, {"a": "none", "b": "none"}, None)
    assert (cfg.method.phase.epochs, cfg.method.phase.unlabeled_batch_size) == (10, 6)
    cfg = compose_cfg(overrides=["dataset=voc", "method=dmt", "split=106"])
    assert pair_spec(cfg) == PairSpec("subsets", {"a": 0, "b": 1}, {"a": "none", "b": "none"},
                                      {"a": "106-l", "b": "106-r"})
    # subsets on a split without a table entry: <split>-l / <split>-r
    assert pair_spec(compose_cfg(overrides=[*DMT, "method.pair_init=subsets"])).warmup == {"a": "8-l", "b": "8-r"}


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["method.pair_init=twins"], ["method.pair_init='twins'", "seeds", "inits", "subsets"]),
    (["method.pair_init=inits", "method.models.b.init=places"], ["method.models.b.init='places'", "imagenet, coco"]),
    (["method.pair_init=inits"], ["two different inits", "method.models.a.init"]),
    (["method.pair_init=subsets", "split=4"], ["split=4", "method.models.a.labeled", "pair_init=inits"]),
    (["method.pair_init=subsets", "method.models.a.labeled=8-r"], ["both 8-r"]),
    (["method.seeds=[3,3]"], ["two different seeds"]),
])
def test_bad_pair_settings_fail_before_any_work(compose_cfg, capsys, overrides, fragments):
    cfg = compose_cfg(overrides=[*DMT, *overrides])
    with pytest.raises(DMTCError):
        pair_spec(cfg)
    expect_user_error(train, cfg, capsys, *fragments)
    assert not (Path(cfg.paths.output_dir) / "phase0_warmup").exists()


def test_missing_init_file_or_subset_list_is_one_error(compose_cfg, capsys, tmp_path):
    missing = tmp_path / "w" / "tiny_coco.pth"
    cfg = compose_cfg(overrides=[*DMT, "method.pair_init=inits", "method.models.a.init=coco",
                                 f"+backbone.weight_files.coco={missing}"])
    expect_user_error(train, cfg, capsys, "model A", "method.models.a.init=coco", str(missing), "backbone.weights")
    # no COCO file configured for this backbone: the init is refused, naming the model and the fix (outside
    # debug=smoke, which falls back to a seeds pair of random init: test_smoke.py)
    cfg = compose_cfg(overrides=[*DMT, "method.pair_init=inits", "method.models.b.init=coco", "~debug",
                                 "backbone=resnet_tiny"])
    expect_user_error(train, cfg, capsys, "model B", "method.models.b.init=coco", "backbone=resnet101")
    # warm-up lists: one that cannot exist, one from outside the run's labeled split
    cfg = compose_cfg(overrides=[*DMT, "method.pair_init=subsets", "method.models.b.labeled=4-r"])
    expect_user_error(train, cfg, capsys, "method.models.b.labeled=4-r", "-l/-r")
    cfg = compose_cfg(overrides=[*DMT, "split=20", "method.pair_init=subsets", "method.models.a.labeled=8-l"])
    expect_user_error(train, cfg, capsys, "method.models.a.labeled=8-l", "outside the run's labeled split", "20-l")


# ---------------------------------------------------------------------------------------------- inputs


def test_stacked_inputs_give_each_model_its_own_normalised_crop(compose_cfg):
    cfg = compose_cfg(overrides=[*DMT, "dataset.crop_size=[80,80]"])  # 64×64 images: crops are padded
    assert not stacks_inputs([IMAGENET, dict(IMAGENET)]) and stacks_inputs([CAFFE, IMAGENET])
    dm, _ = build_datamodule(cfg, input_norms=[CAFFE, IMAGENET])
    item = dm.train_dataset()[0]
    assert item["image"].shape == (6, 80, 80) and item["label"].shape == (80, 80)
    image = item["image"].unsqueeze(0)
    padded = (item["label"] == 255) & (image[0].abs().sum(0) == 0)
    assert padded.any()  # crop padding is 0 in both blocks, as each pipeline alone pads its own input
    inside = ~padded
    a, b = _raw_rgb(image[:, :3], CAFFE)[0], _raw_rgb(image[:, 3:], IMAGENET)[0]
    assert torch.allclose(a[:, inside], b[:, inside], atol=1e-3)  # the same crop and flip
    val = dm.val_dataset()[0]["image"]
    assert val.shape[0] == 6
    single, _ = build_datamodule(cfg)
    assert single.train_dataset()[0]["image"].shape[0] == 3


# ---------------------------------------------------------------------------------------------- end to end


def _hung_coco_file(path: Path, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """A COCO DeepLab-v2 file of the tiny backbone in Hung et al.'s key layout (as tests/test_inits.py)."""
    torch.manual_seed(123)
    source = deeplab_v2(num_classes, backbone="resnet_tiny")
    state = {}
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        name = key[len("backbone."):] if key.startswith("backbone.") else "layer5.conv2d_list." + key[len(
            "classifier.convs."):]
        state[name] = value.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("streams", ["shared", "independent"])
def test_inits_pair_starts_from_two_inits_with_their_own_inputs(compose_cfg, tmp_path, streams):
    """pair_init=inits: A from a COCO file (Caffe inputs: BGR 0–255 minus the mean), B random (ImageNet
    inputs); warm-up, labeling and a phase run end to end, each model always fed its own normalisation.
    Shared streams: a step's two inputs are one crop under the two pipelines; independent: two crops."""
    path = tmp_path / "w" / "tiny_coco.pth"
    coco = _hung_coco_file(path)
    cfg = compose_cfg(overrides=[*DMT, *SMALL, f"method.streams={streams}", "method.pair_init=inits",
                                 "method.models.a.init=coco",
                                 "method.models.b.init=none", f"+backbone.weight_files.coco={path}",
                                 "+callbacks.probe._target_=test_pair_init.InputProbe"])
    _reset()
    results = train(cfg)
    assert results["pair_init"] == "inits" and results["pair"]["inits"] == {"a": "coco", "b": "none"}
    assert results["pair"]["stacked_inputs"] is True
    assert [p["name"] for p in results["phases"]] == ["phase0_warmup", "phase1_r1"]
    # A starts from the COCO file, B does not
    initial = SEEN["initial"]
    assert all(torch.equal(initial["a"][k], v) for k, v in coco.items())
    assert not torch.equal(initial["b"]["backbone.conv1.weight"], coco["backbone.conv1.weight"])
    # every forward pass of A got Caffe-scale inputs, of B ImageNet-scale ones, 3 channels each
    wheres = {(w, k) for w, k, *_ in SEEN["inputs"]}
    assert wheres >= {(w, k) for w in ("fit:warmup", "fit:warmup:val", "outside", "fit:mutual", "fit:mutual:val")
                      for k in "ab"}
    for _, key, channels, absmax in SEEN["inputs"]:
        assert channels == 3
        assert absmax > 20 if key == "a" else absmax < 3
    # ... and the two inputs of a step are the same image under the two pipelines (shared streams; always
    # in labeling), or two different crops (independent streams)
    for where in ("fit:warmup", "outside", "fit:mutual"):
        a, b = SEEN["first"][(where, "a")], SEEN["first"][(where, "b")]
        same = a.shape == b.shape and torch.allclose(_raw_rgb(a, CAFFE), _raw_rgb(b, IMAGENET), atol=1e-3)
        assert same == (streams == "shared" or where == "outside"), where
    run = Path(results["output_dir"])
    assert json.loads((run / "phase1_r1" / "done.json").read_text())["pseudo"]["a"]["num_images"] == 21


def test_subsets_warm_up_on_their_own_lists_then_the_whole_split(compose_cfg):
    """pair_init=subsets: A's warm-up batches hold only -l images and B's only -r images (one optimizer
    step per pair of batches); the phase trains both on the run's whole labeled split."""
    cfg = compose_cfg(overrides=[*DMT, *SMALL, "method.pair_init=subsets",
                                 "+callbacks.probe._target_=test_pair_init.NameProbe"])
    prepare_dataset(cfg)
    train_names = build_layout(cfg).names("train")
    labeled = dmt_split(train_names, 8, 0)[0]
    left, right = (dms_subset(lambda s, i: dmt_split(train_names, split_ratio(s), i)[0], "8", 0, side)
                   for side in "lr")
    assert len(labeled) == 3 and len(left) == len(right) == 2 and set(left) != set(right)
    _reset()
    results = train(cfg)
    assert results["pair"]["warmup_lists"] == {"a": "8-l", "b": "8-r"}
    seen_a = [n for batch in SEEN["warmup"] for n in batch["a"]]
    seen_b = [n for batch in SEEN["warmup"] for n in batch["b"]]
    assert sorted(seen_a) == sorted(left) and sorted(seen_b) == sorted(right)  # batch 2: the whole list
    assert len(SEEN["warmup"]) == results["phases"][0]["steps"] == 1  # global_step counts pairs of batches
    assert SEEN["phase_sets"] == [sorted(labeled)] * 2  # the phase: the run's whole labeled split (DMT's
    # scripts), one stream per model
    assert set(SEEN["phase_labeled"]) <= set(labeled) and len(SEEN["phase_labeled"]) == 3 * 2  # 21 // 6 batches


def test_seeds_pair_is_unchanged(compose_cfg):
    """The default synthetic pair: the config's init under the run's seed + 0 and + 1 (as before)."""
    cfg = compose_cfg(overrides=DMT)
    models = build_pair(cfg)
    for key, offset in (("a", 0), ("b", 1)):
        torch.manual_seed(int(cfg.seed) + offset)
        ref = deeplab_v2(10, backbone="resnet_tiny")
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in models[key].state_dict().items())
    assert not stacks_inputs([IMAGENET, INIT_INPUTS["none"]])


@pytest.mark.parametrize("streams", ["independent", "shared"])
def test_each_model_its_own_stream(compose_cfg, streams):
    """method.streams=independent (the default): A and B see the same split in their own orders (warm-up
    and phases), and A's unlabeled batches carry only B's pseudo labels, B's only A's; shared: one batch."""
    cfg = compose_cfg(overrides=["method=dmt", "method.ratios=[1.0]", "method.phase.epochs=1",
                                 "dataset.generate.spec.num_train=40", "trainer.limit_train_batches=null",
                                 f"method.streams={streams}", "+callbacks.probe._target_=test_pair_init.NameProbe"])
    assert cfg.method.streams == streams
    _reset()
    results = train(cfg)
    assert results["phases"][0]["steps"] == 2 and results["phases"][1]["steps"] == 5  # 5 // 2; 35 // 6
    warm_a = [n for b in SEEN["warmup"] for n in b["a"]]
    warm_b = [n for b in SEEN["warmup"] for n in b["b"]]
    batches = SEEN["phase_batches"]
    unl_a = [n for b in batches for n in b["a"][1]]
    unl_b = [n for b in batches for n in b["b"][1]]
    assert len(set(unl_a)) == len(unl_a) == 30 and len(set(unl_b)) == 30  # each: one pass (drop_last)
    if streams == "independent":
        assert warm_a != warm_b and len(set(warm_a) | set(warm_b)) <= results["num_labeled"] == 5
        assert unl_a != unl_b
        assert all(b["a"][2] == ["conf_b", "image", "label_b", "name"] for b in batches)
        assert all(b["b"][2] == ["conf_a", "image", "label_a", "name"] for b in batches)
        assert SEEN["phase_unlabeled"][0] == SEEN["phase_unlabeled"][1]  # the same unlabeled set
    else:
        assert warm_a == warm_b and unl_a == unl_b
        assert all(b["a"][2] == ["conf_a", "conf_b", "image", "label_a", "label_b", "name"] for b in batches)
