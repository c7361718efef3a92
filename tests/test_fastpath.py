"""The GPU fast-path options (cluster.channels_last, cluster.compile, cluster.optimizer_impl) through the
Trainer's own `_prepare` and `train_step`, on CPU: with each option on, a few steps give the default's losses
(within TOL: compile and channels-last sum in another order), the checkpoint has the default's keys and
resumes either way, SyncBN stays converted, and the step reads nothing back from the device.

The model is a tiny conv-BN net (compiling a zoo model for training takes minutes on 2 cores; the zoo's
compile: test_models_compile.py). torch.compile runs inductor, as a run does: two compiles (~20 s CPU each).
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ocr_cluster import config
from ocr_cluster.train import checkpoint, fastpath
from ocr_cluster.train.fastpath import ddp_options
from ocr_cluster.train.loop import Trainer
from ocr_cluster.train.trace import StepTrace

TOL = 1e-4  # relative, on each step's loss
STEPS, BATCH, SIZE, CLASSES = 4, 2, 32, 3
COMPILE = ("cluster.compile=true",)
CHANNELS_LAST_FUSED = ("cluster.channels_last=true", "cluster.optimizer_impl=fused")
ALL = ("cluster.channels_last=true", "cluster.compile=true", "cluster.optimizer_impl=fused")


class TinySegmentor(nn.Module):
    """What the Trainer needs of a zoo model: .backbone (the optimizer's groups), .loss_weights, and
    {'decode', 'aux'} logits at a stride in training."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.decode_head = nn.Conv2d(8, CLASSES, 1)
        self.auxiliary_head = nn.Conv2d(8, CLASSES, 1)
        self.loss_weights = {"decode": 1.0, "aux": 0.4}

    def forward(self, images):
        feats = self.backbone(images)
        return {"decode": self.decode_head(feats), "aux": self.auxiliary_head(feats)}


def _batches(start: int = 0, accum: int = 1):
    """The same batch, split into `accum` micro-batches, at every iteration from `start` on (a resume starts
    later): the loss must fall."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    label = torch.randint(0, CLASSES, (BATCH, SIZE, SIZE), generator=gen)
    label[:, :4] = 255  # some ignored pixels
    micro = BATCH // accum
    for _ in range(start, STEPS):
        for i in range(0, BATCH, micro):
            yield {"image": image[i:i + micro], "label": label[i:i + micro], "key": ["k"] * micro}


class _Losses:
    """Stands in for Progress (a TensorBoard writer on rank 0): keeps each step's loss."""

    def __init__(self):
        self.values: list[float] = []

    def add_loss(self, total, parts, accum):
        self.values.append(total.detach())

    def data_wait(self, seconds):
        pass

    def per_step(self, accum: int) -> list[float]:
        values = [float(v) for v in self.values]
        return [sum(values[i:i + accum]) / accum for i in range(0, len(values), accum)]


def _trainer(*overrides: str, accum: int = 1, wrap=None, start: int = 0, model=None) -> Trainer:
    """A Trainer as train_fn_per_worker builds it, minus Ray: the config's options, `_prepare` with `wrap` for
    Ray's prepare_model (DDP when given), the fixed batches from iteration `start`."""
    cfg = config.load(overrides=[f"data.batch_size={BATCH}", "cluster.num_workers=1", "schedule.iters=100",
                                 "optimizer.lr=0.1",
                                 *overrides])
    trainer = object.__new__(Trainer)
    trainer.cfg, trainer.device, trainer.dtype, trainer.rank, trainer.world = cfg, torch.device("cpu"), None, 0, 1
    trainer.start_iter = 0  # train_step marks the first batch of an attempt
    trainer.layout = SimpleNamespace(accum_steps=accum)
    torch.manual_seed(0)
    trainer._prepare(model or TinySegmentor(), wrap=wrap or (lambda m: m))
    trainer.class_weight = trainer.ohem = None
    trainer.batches = _batches(start, accum)
    trainer.progress, trainer.trace = _Losses(), StepTrace(0)
    return trainer


def _train(trainer: Trainer, start: int = 0, accum: int = 1) -> list[float]:
    for it in range(start, STEPS):
        trainer.train_step(it)
    return trainer.progress.per_step(accum)


def _close(got: list[float], expected: list[float]) -> bool:
    return len(got) == len(expected) and all(abs(g - e) <= TOL * abs(e) for g, e in zip(got, expected))


@pytest.fixture(scope="module")
def default_losses() -> list[float]:
    return _train(_trainer())


@pytest.mark.parametrize("overrides", [("cluster.channels_last=true",), ("cluster.optimizer_impl=foreach",),
                                       ("cluster.optimizer_impl=fused",), COMPILE], ids=lambda o: o[0][8:])
def test_each_option_trains_as_the_default(overrides, default_losses):
    trainer = _trainer(*overrides)
    losses = _train(trainer)
    assert _close(losses, default_losses), f"{overrides}: {losses} vs the default's {default_losses}"
    assert losses[-1] < losses[0]  # it trained
    if "cluster.compile=true" in overrides:
        assert trainer.forward is not trainer.model and trainer.forward._orig_mod is trainer.model
    else:
        assert trainer.forward is trainer.model


def test_the_options_together_under_ddp_with_accumulation(tmp_path):
    """DDP (gloo, one rank) wrapped before compile, as Ray's prepare_model does in a run; accumulation steps
    under DDP's no_sync, through the compiled module."""
    import torch.distributed as dist

    reference = _train(_trainer(accum=2), accum=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        trainer = _trainer(*ALL, accum=2, wrap=lambda m: nn.parallel.DistributedDataParallel(m, **ddp_options(m)))
        losses = _train(trainer, accum=2)
    finally:
        dist.destroy_process_group()
    assert isinstance(trainer.model, nn.parallel.DistributedDataParallel)
    assert trainer.forward._orig_mod is trainer.model  # compile outside DDP
    assert trainer.model.module.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    assert _close(losses, reference), f"{losses} vs the default's {reference}"


@pytest.fixture(autouse=True)
def _free_the_ddp_here():
    """Dynamo's caches keep the compiled DDP, and through its reducer the gloo group, alive after the test. Freed
    later in a forked child (other tests fork writers), the group's destructor detaches threads the child does
    not have and aborts it (one CI run: SIGABRT in test_fidelity_results). Free them here, where they exist."""
    yield
    torch._dynamo.reset()
    gc.collect()


def _saved(trainer: Trainer, directory) -> dict:
    checkpoint.save(directory, trainer.model, trainer.optimizer, 2, meta={})
    return torch.load(directory / "model.pt", weights_only=True)["model"]


@pytest.mark.parametrize("options", [CHANNELS_LAST_FUSED, COMPILE], ids=["channels_last+fused", "compile"])
def test_checkpoints_are_the_defaults_and_resume_with_or_without_the_options(tmp_path, default_losses, options):
    """Either way: a checkpoint of a run with `options` resumed without them, and one without resumed with
    them, continue as the uninterrupted default run."""
    fast, plain = _trainer(*options), _trainer()
    for trainer in (fast, plain):
        for it in range(2):
            trainer.train_step(it)
    fast_keys, plain_keys = list(_saved(fast, tmp_path / "fast")), list(_saved(plain, tmp_path / "plain"))
    assert fast_keys == plain_keys  # no _orig_mod. prefix, nothing added or lost
    assert fast.optimizer.state_dict()["state"].keys() == plain.optimizer.state_dict()["state"].keys()

    for saved, resumed_options in ((tmp_path / "fast", ()), (tmp_path / "plain", options)):
        resumed = _trainer(*resumed_options, start=2)
        assert checkpoint.load(saved, resumed.model, resumed.optimizer)[0] == 2
        fused = "cluster.optimizer_impl=fused" in resumed_options
        assert all(bool(group.get("fused")) == fused for group in resumed.optimizer.param_groups), \
            "the optimizer's kernels are this run's, not the checkpoint's"
        losses = _train(resumed, start=2)
        assert _close(losses, default_losses[2:]), \
            f"{saved.name}'s checkpoint resumed with {resumed_options}: {losses} vs {default_losses[2:]}"


def test_syncbn_is_converted_before_channels_last_and_compile():
    """Trainer._build_model converts BN to SyncBN for DDP on GPUs; the fast path keeps those modules."""
    trainer = object.__new__(Trainer)
    trainer.cfg = config.load(overrides=["cluster.num_workers=2", *ALL[:2]])
    trainer.world, trainer.rank, trainer.device = 2, 0, torch.device("cuda")  # only read to decide on SyncBN
    trainer.manifest = SimpleNamespace(num_classes=CLASSES)
    built = trainer._build_model(fresh=True)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in built.modules())
    trainer.device, trainer.dtype = torch.device("cpu"), None
    trainer._prepare(built, wrap=lambda m: m)
    norms = [m for m in trainer.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert ddp_options(trainer.model) == {"broadcast_buffers": False}
    assert trainer.forward._orig_mod is trainer.model
    convs = [m for m in trainer.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


class _HostReads:
    """Counts reads of a tensor's value on the host (each one a wait for the GPU there)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)
        return read


@pytest.mark.parametrize("impl, scaler, reads", [("auto", False, 0), ("fused", True, 0), ("foreach", True, 2)])
def test_the_step_reads_nothing_back_but_the_unfused_fp16_scalers_check(monkeypatch, impl, scaler, reads):
    """The fp16 GradScaler (GPUs without native bf16) reads its inf check back before each unfused step;
    a fused optimizer takes the check on the device instead."""
    trainer = _trainer(f"cluster.optimizer_impl={impl}")
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=scaler)
    trainer.train_step(0)  # torch's first-call work out of the way
    counter = _HostReads(monkeypatch)
    trainer.train_step(1)
    trainer.train_step(2)
    assert counter.count == reads


def test_a_fused_optimizer_this_torch_lacks_is_one_line(monkeypatch):
    with pytest.raises(config.ConfigError) as info:
        fastpath.optimizer_impl("fused", "sgd", "meta")
    assert str(info.value) == (f"cluster.optimizer_impl fused: torch {torch.__version__} has no fused SGD for meta "
                               f"parameters (only for {', '.join(fastpath.fused_devices())}); use foreach or auto")
    monkeypatch.setattr(fastpath, "fused_devices", lambda: ["cuda"])  # as torch < 2.4, fused on CUDA only
    cfg = config.load(overrides=["cluster.optimizer_impl=fused", "optimizer.type=adamw"])
    with pytest.raises(config.ConfigError, match="no fused AdamW for cpu parameters"):
        fastpath.check(cfg.cluster, cfg.optimizer.type)
    fastpath.check(config.load(overrides=["cluster.optimizer_impl=fused", "cluster.use_gpu=true"]).cluster, "sgd")
    assert fastpath.optimizer_impl("auto", "sgd", "meta") == {}


def test_the_options_leave_the_run_id_alone_and_are_validated():
    default = config.load()
    fast = config.load(overrides=[*ALL, "cluster.channels_last=true"])
    assert (fast.cluster.channels_last, fast.cluster.compile, fast.cluster.optimizer_impl) == (True, True, "fused")
    assert (default.cluster.channels_last, default.cluster.compile, default.cluster.optimizer_impl) == \
        (False, False, "auto")
    assert fast.run_id == default.run_id  # same training, other kernels: a rerun resumes the same run
    with pytest.raises(config.ConfigError, match="cluster.optimizer_impl: unknown value 'fuse'.*did you mean 'fused'"):
        config.load(overrides=["cluster.optimizer_impl=fuse"])
    with pytest.raises(config.ConfigError, match="cluster.compile: expected bool"):
        config.load(overrides=["cluster.compile=inductor"])
