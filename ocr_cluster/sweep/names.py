"""Job and cell names in mmsegmentation 1.x's naming: `{method}_{backbone}_{gpus}xb{batch}-{iters}_{dataset}-{crop}`.

    ocrnet_hr18_4xb2-40k_cityscapes-512x1024      OCRNet, HRNetV2p-W18, 4 GPUs x 2 images, 40k iterations

The jobs/ files (scripts/make_jobs.py) and the sweep cells (ocr_cluster.sweep.grid) are named by this
one function. Recipe changes the name does not show (lr, min_lr, align_corners, loss reduction) are the
grid's business: two cells of one sweep that differ only in those are refused there.
"""

from __future__ import annotations

from ocr_cluster.config import Config, ConfigError

# head (ocr_cluster.models.names.HEADS) -> the method part; mmseg's names where mmseg has the model
METHOD_SHORT = {
    "ocr": "ocrnet",
    "ocr_dropout": "ocrnet-dropout",
    "ocr_sepconv": "ocrnet-sepconv",
    "ocrplus": "ocrnetplus",
    "ocrplus_sepdecoder": "ocrnetplus-sepdecoder",
    "ocrplus_sepconv": "ocrnetplus-sepconv",
    "asp_ocr": "ocrnet-asp",
    "fcn": "fcn",
    "deeplabv3": "deeplabv3",
    "deeplabv3_sepconv": "deeplabv3-sepconv",
    "deeplabv3plus": "deeplabv3plus",
    "isa": "isanet",
    "base_oc": "ocnet-base",
    "asp_oc": "ocnet-asp",
}

# backbone (ocr_cluster.models.names.BACKBONES) -> mmseg's short name
BACKBONE_SHORT = {
    "hrnetv2_w18_small": "hr18s",
    "hrnetv2_w18": "hr18",
    "hrnetv2_w48": "hr48",
    "resnet50_d8": "r50-d8",
    "resnet101_d8": "r101-d8",
    "resnet50_d16": "r50-d16",
    "resnet101_d16": "r101-d16",
}

# dataset (ocr_cluster.config.DATASETS) -> mmseg's dataset part
DATASET_SHORT = {
    "synthetic": "synthetic",
    "cityscapes": "cityscapes",
    "ade20k": "ade20k",
    "voc-aug": "voc12aug",
    "pascal-context": "pascal-context",
    "pascal-context-59": "pascal-context-59",
    "coco-stuff164k": "coco-stuff164k",
    "coco-stuff10k": "coco-stuff10k",
    "lip": "lip",
}


def schedule(iters: int) -> str:
    """40000 -> '40k' as mmseg writes it; a count that is not whole thousands stays a number (39660)."""
    return f"{iters // 1000}k" if iters % 1000 == 0 else str(iters)


def job_name(*, head: str, backbone: str, gpus: int, per_gpu: int, iters: int, dataset: str, crop: str,
             ohem: bool = False) -> str:
    """The mmseg-style name of a training job; OHEM adds '-ohem' to the method, as mmseg's sampler configs."""
    method = METHOD_SHORT.get(head, head.replace("_", "-")) + ("-ohem" if ohem else "")
    return (f"{method}_{BACKBONE_SHORT.get(backbone, backbone)}_{gpus}xb{per_gpu}-{schedule(iters)}_"
            f"{DATASET_SHORT.get(dataset, dataset)}-{crop}")


def config_name(cfg: Config) -> str:
    """job_name of a resolved config: GPUs = cluster.num_workers (one per worker), batch = per worker."""
    workers = max(cfg.cluster.num_workers, 1)
    if cfg.data.batch_size % workers:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} does not split over cluster.num_workers "
                          f"{workers}; use a multiple of {workers}")
    return job_name(head=cfg.model.head, backbone=cfg.model.backbone, gpus=workers,
                    per_gpu=cfg.data.batch_size // workers, iters=cfg.schedule.iters, dataset=cfg.data.dataset,
                    crop=cfg.data.crop_size, ohem=cfg.loss.ohem)
