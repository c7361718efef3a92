"""The GPU-only paths of the training loop whose logic can be checked on CPU: the AMP dtype chosen per
device capability, losses kept on the device between log lines, the CUDA RNG reseeded on a resume,
cuDNN's benchmark switched around evaluation, the training memory peak, fps with post-processing."""

from __future__ import annotations

import pytest
import torch

from ocr_cluster.train.fastpath import amp_dtype, native_cpu_bf16


def test_amp_auto_picks_bf16_only_where_it_is_native():
    cuda = torch.device("cuda")
    assert amp_dtype("auto", cuda, capability=(8, 0)) is torch.bfloat16  # A100
    assert amp_dtype("auto", cuda, capability=(9, 0)) is torch.bfloat16  # H100
    assert amp_dtype("auto", cuda, capability=(7, 0)) is torch.float16   # V100: bf16 only emulated
    assert amp_dtype("auto", cuda, capability=(7, 5)) is torch.float16   # T4
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu, cpu_bf16=True) is None  # auto: fp32 on every CPU (run ids of CPU runs kept)
    assert amp_dtype("none", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16


def test_native_bf16_is_bf16_where_native_else_fp32():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert amp_dtype("native-bf16", cuda, capability=(8, 0)) is torch.bfloat16
    assert amp_dtype("native-bf16", cuda, capability=(7, 0)) is None  # V100: fp32, not fp16
    assert amp_dtype("native-bf16", cpu, cpu_bf16=True) is torch.bfloat16  # AVX512-BF16
    assert amp_dtype("native-bf16", cpu, cpu_bf16=False) is None  # emulated bf16 is slower than fp32
    assert amp_dtype("native-bf16", cpu) is (torch.bfloat16 if native_cpu_bf16() else None)
    assert amp_dtype("bf16", cuda, capability=(7, 0)) is torch.bfloat16  # asked for explicitly: as asked
    assert amp_dtype("none", cuda, capability=(9, 0)) is None


def _progress(iters: int, log_interval: int, rank: int = 1):
    """A Progress off rank 0 (no TensorBoard writer): what every rank runs each step."""
    from types import SimpleNamespace

    from ocr_cluster.train.progress import Progress

    cfg = SimpleNamespace(schedule=SimpleNamespace(iters=iters, log_interval=log_interval))
    layout = SimpleNamespace(run_id="rtest", tensorboard_uri="unused")
    return Progress(cfg, layout, start_iter=0, rank=rank, images_per_iter=2)


class _HostReads:
    """Counts the reads of a tensor's value on the host (each one a wait for the GPU there)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__float__", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)
        return read


def test_losses_stay_on_the_device_until_a_log_line(monkeypatch):
    progress = _progress(iters=12, log_interval=4)
    reads = _HostReads(monkeypatch)
    for done in range(1, 13):
        for _ in range(2):  # accum_steps 2
            progress.add_loss(torch.tensor(float(done)), {"decode": torch.tensor(1.0), "aux": torch.tensor(0.5)}, 2)
        progress.step(done, lr=0.01)
    assert reads.count == 3  # one read per log line (iterations 4, 8, 12), none per step


def test_the_reported_losses_are_the_window_means():
    progress = _progress(iters=10, log_interval=5)
    for done in (1, 2):
        progress.add_loss(torch.tensor(float(done)), {"decode": torch.tensor(2.0 * done)}, 1)
        progress.step(done, lr=0.01)
    assert progress.synced(2) == {"loss": 1.5, "loss_decode": 3.0}


def test_a_nan_loss_is_caught_at_the_next_log_line_naming_the_window():
    import pytest

    progress = _progress(iters=20, log_interval=4)
    for done in range(1, 6):
        progress.add_loss(torch.tensor(1.0), {}, 1)
        progress.step(done, lr=0.01)  # the log line at 4 is fine
    progress.add_loss(torch.tensor(float("nan")), {}, 1)
    progress.step(6, lr=0.01)  # not a log line: not read yet
    progress.add_loss(torch.tensor(1.0), {}, 1)
    progress.step(7, lr=0.01)
    progress.add_loss(torch.tensor(1.0), {}, 1)
    with pytest.raises(FloatingPointError, match="the loss became nan between iterations 5 and 8"):
        progress.step(8, lr=0.01)


def test_a_nan_loss_is_caught_before_a_checkpoint_between_log_lines():
    import pytest

    progress = _progress(iters=20, log_interval=10)
    progress.add_loss(torch.tensor(float("inf")), {}, 1)
    progress.step(1, lr=0.01)
    with pytest.raises(FloatingPointError, match="inf between iterations 1 and 3"):
        progress.synced(3)  # what after_step calls when an evaluation or a checkpoint is due


def test_cudnn_benchmark_is_switched_for_a_block_and_restored():
    from ocr_cluster.train.fastpath import cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True  # as training sets it
        with cudnn_benchmark(False):
            assert torch.backends.cudnn.benchmark is False  # evaluation, fps
        assert torch.backends.cudnn.benchmark is True
        try:
            with cudnn_benchmark(False):
                raise RuntimeError("an evaluation that fails")
        except RuntimeError:
            pass
        assert torch.backends.cudnn.benchmark is True  # restored also then
    finally:
        torch.backends.cudnn.benchmark = before


def _cuda_seeds(monkeypatch) -> list[int]:
    """The seeds given to the CUDA generators, as if a GPU were there."""
    seeds: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeds.append)
    return seeds


def test_a_resume_reseeds_rank_0s_cuda_generator_and_keeps_its_restored_cpu_state(monkeypatch):
    from ocr_cluster.train.loop import reseed_resumed, worker_seed

    torch.manual_seed(123)
    restored = torch.get_rng_state()  # as checkpoint.load leaves it on rank 0
    seeds = _cuda_seeds(monkeypatch)
    reseed_resumed(5, rank=0, start_iter=40, cpu_restored=True)
    assert torch.equal(torch.get_rng_state(), restored)
    assert seeds == [worker_seed(5, 0, resumed_at=40)]
    assert seeds[0] != worker_seed(5, 0)  # not the fresh start's stream: no dropout masks replayed


def test_a_resume_reseeds_other_ranks_cpu_and_cuda_per_rank_and_resume_point(monkeypatch):
    from ocr_cluster.train.loop import reseed_resumed, worker_seed

    _cuda_seeds(monkeypatch)
    seeded: list[int] = []
    monkeypatch.setattr(torch, "manual_seed", seeded.append)  # torch.manual_seed seeds CUDA too
    reseed_resumed(5, rank=1, start_iter=40, cpu_restored=False)
    reseed_resumed(5, rank=2, start_iter=40, cpu_restored=False)
    assert seeded == [worker_seed(5, 1, resumed_at=40), worker_seed(5, 2, resumed_at=40)]
    assert len(set(seeded)) == 2


class _FakeCudaMemory:
    """torch.cuda's peak-memory counter as a GPU would keep it: allocate() raises the peak."""

    def __init__(self, monkeypatch):
        self.current = self.peak = 0
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)

    def reset(self, device=None):
        self.peak = self.current

    def allocate(self, size: int):
        self.peak = max(self.peak, self.current + size)


def test_the_training_peak_leaves_out_evaluations(monkeypatch):
    from ocr_cluster.train.loop import TrainingPeak

    gpu = _FakeCudaMemory(monkeypatch)
    memory = TrainingPeak(torch.device("cuda"))
    memory.restart()
    gpu.allocate(3 * 1024**3)   # training
    memory.note()               # before an evaluation
    gpu.allocate(9 * 1024**3)   # the evaluation (full-size images)
    memory.restart()            # after it
    gpu.allocate(4 * 1024**3)   # training again
    memory.note()               # the end of training
    gpu.allocate(12 * 1024**3)  # ms+flip and the fps run
    assert memory.gb_over_ranks() == 4.0


def test_the_training_peak_is_none_on_cpu_and_the_max_over_ranks_under_gloo(monkeypatch, tmp_path):
    import torch.distributed as dist

    from ocr_cluster.train.loop import TrainingPeak

    assert TrainingPeak(torch.device("cpu")).gb_over_ranks() is None
    gpu = _FakeCudaMemory(monkeypatch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        memory = TrainingPeak(torch.device("cuda"))
        gpu.allocate(2 * 1024**3)
        memory.note()
        assert memory.gb_over_ranks() == 2.0  # the all-reduce (MAX) ran, on the CPU under gloo
    finally:
        dist.destroy_process_group()


def test_the_fps_run_holds_a_few_images_and_cycles_them(monkeypatch):
    from types import SimpleNamespace

    from ocr_cluster.train import loop

    drawn = []

    def val_images(data, **kwargs):
        for i in range(500):
            drawn.append(i)
            yield {"image": torch.full((3, 4, 6), float(i)), "height": 8, "width": 12}

    timed = {}
    monkeypatch.setattr(loop, "iter_eval", val_images)
    monkeypatch.setattr(loop, "measure_fps", lambda model, images, device, **kw: timed.update(images=images, **kw))
    cfg = SimpleNamespace(data=None, evaluation=SimpleNamespace(fps_images=200))
    model = SimpleNamespace(final_head=SimpleNamespace(align_corners=True))
    loop.fps_on_val(model, cfg, None, torch.device("cpu"), None)
    assert len(drawn) == 8  # not 200 full-size images in memory at once
    assert len(timed["images"]) == 200 and len({id(image) for image in timed["images"]}) == 8
    assert [int(image[0, 0, 0]) for image in timed["images"][:10]] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert timed["out_sizes"] == [(8, 12)] * 200 and timed["align_corners"] is True


def test_measure_fps_times_the_post_processing_at_the_original_size(monkeypatch):
    import torch.nn.functional as F

    from ocr_cluster.train.inference import measure_fps

    resized = []
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, size=None, **kw: resized.append(size) or interpolate(x, size, **kw))
    model = torch.nn.Conv2d(3, 4, 1)
    images = [torch.zeros(3, 4, 6)] * 7
    fps = measure_fps(model, images, torch.device("cpu"), warmup=5, out_sizes=[(8, 12)] * 7)
    assert fps is not None and fps > 0
    assert resized == [(8, 12)] * 7  # the logits resized to the original size in every (timed) call
    assert model.training  # left as it was


def test_ddp_skips_the_buffer_broadcast_only_with_syncbn():
    from ocr_cluster.models import convert_sync_batchnorm
    from ocr_cluster.train.fastpath import ddp_options

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert ddp_options(model) == {}  # plain BN: DDP broadcasts rank 0's running statistics, as mmseg
    assert ddp_options(convert_sync_batchnorm(model)) == {"broadcast_buffers": False}


def test_a_warning_when_the_workers_take_every_cpu_ray_data_would_use():
    from ocr_cluster.train.driver import data_cpus_warning

    line = data_cpus_warning(cluster_cpus=64, workers=8, cpus_per_worker=8)  # 8 vCPUs per GPU
    assert line == ("warning: the cluster has 64 CPUs and the 8 training worker(s) take 8 x 8 = 64: none left "
                    "for Ray Data, so training will wait for its data; set cluster.cpus_per_worker lower "
                    "(e.g. 6; 0 sizes it from the nodes) or add CPU nodes")
    assert data_cpus_warning(cluster_cpus=96, workers=8, cpus_per_worker=8) is None  # 32 left for Ray Data
    assert data_cpus_warning(cluster_cpus=4, workers=8, cpus_per_worker=1) is not None  # not even the workers'


def node(cpus: float, gpus: float = 0) -> dict:
    """One alive node as `ray.nodes()` lists it (the fields the sizing reads)."""
    return {"Alive": True, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_cpus_per_worker_0_is_sized_from_the_clusters_nodes():
    from ocr_cluster.train.driver import auto_cpus_per_worker, data_cpus_warning

    # GPU workers: a quarter of the leanest GPU node's CPUs per GPU, 1 to 4; a CPU-only head does not count.
    assert auto_cpus_per_worker([node(8), node(64, 8)], world=8, use_gpu=True)[0] == 2  # p4d-like: 8 per GPU
    assert auto_cpus_per_worker([node(96, 8), node(64, 8)], world=16, use_gpu=True)[0] == 2
    assert auto_cpus_per_worker([node(192, 8)], world=8, use_gpu=True)[0] == 4  # capped: the rest decodes
    assert auto_cpus_per_worker([node(16, 4)], world=4, use_gpu=True)[0] == 1  # at least one
    cpus, why = auto_cpus_per_worker([node(4)], world=2, use_gpu=True)
    assert cpus == 2 and "no GPU node" in why  # autoscaler: GPU nodes not up yet
    # Whatever the node, the workers leave Ray Data CPUs.
    for cluster in ([node(64, 8)], [node(8, 1)], [node(12, 1)], [node(96, 8), node(32, 4)]):
        world = int(sum(n["Resources"]["GPU"] for n in cluster))
        cpus, _ = auto_cpus_per_worker(cluster, world=world, use_gpu=True)
        assert data_cpus_warning(sum(n["Resources"]["CPU"] for n in cluster), world, cpus) is None, cluster
    # CPU workers: an equal share of three quarters of the cluster's CPUs, at most one node's, at least 1.
    assert auto_cpus_per_worker([node(4)], world=2, use_gpu=False)[0] == 1  # the test head
    assert auto_cpus_per_worker([node(32)], world=2, use_gpu=False)[0] == 12
    assert auto_cpus_per_worker([node(16), node(16)], world=1, use_gpu=False)[0] == 16
    assert auto_cpus_per_worker([node(2)], world=4, use_gpu=False)[0] == 1


def test_cpus_per_worker_must_not_be_negative():
    from ocr_cluster import config

    with pytest.raises(config.ConfigError, match=r"cluster.cpus_per_worker: must be >= 0 \(0 sizes it"):
        config.load(None, ["cluster.cpus_per_worker=-1"])
    assert config.load(None, ["cluster.cpus_per_worker=0"]).cluster.cpus_per_worker == 0


def test_a_local_clusters_object_store_is_sized_from_the_run_and_the_node():
    from ocr_cluster import config
    from ocr_cluster.train.driver import MIN_OBJECT_STORE, OBJECT_STORE_BATCHES, local_object_store_bytes

    GiB = 1024**3
    quickstart = config.load("jobs/quickstart.yaml", [])  # 128x128 crops, batch 8: 27 MB of crops in flight
    assert local_object_store_bytes(quickstart, node_memory=24 * GiB) == MIN_OBJECT_STORE
    city = config.load("jobs/quickstart.yaml", ["data.crop_size=512x1024", "data.batch_size=16"])
    need = OBJECT_STORE_BATCHES * 16 * 512 * 1024 * 13  # float32 image + uint8 label per crop
    assert need > MIN_OBJECT_STORE and local_object_store_bytes(city, node_memory=64 * GiB) == need
    assert local_object_store_bytes(city, node_memory=4 * GiB) == int(0.3 * 4 * GiB)  # Ray's default share caps it
    assert local_object_store_bytes(city, node_memory=1 * GiB) == MIN_OBJECT_STORE  # never below the old fixed size
