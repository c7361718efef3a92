"""Display names, as the seeds' tables print them (mmseg's "OCRNet", "HRNetV2p-W18", "R-101-D8")."""

from __future__ import annotations

# head (ocr_cluster.models.names.HEADS) -> the Method column
METHOD_LABELS = {
    "ocr": "OCRNet",
    "ocr_dropout": "OCRNet (w/ dropout)",
    "ocr_sepconv": "OCRNet (fusion w/ SepDepthWiseConv)",
    "ocrplus": "OCRNetPlus",
    "ocrplus_sepdecoder": "OCRNetPlus (Decoder w/ SepDepthWiseConv)",
    "ocrplus_sepconv": "OCRNetPlus (OCR & Decoder w/ SepDepthWiseConv)",
    "asp_ocr": "ASP-OCR",
    "fcn": "FCN",
    "deeplabv3": "DeepLabV3",
    "deeplabv3_sepconv": "DeepLabV3 (w/ SepDepthWiseConv)",
    "deeplabv3plus": "DeepLabV3+",
    "isa": "ISA",
    "base_oc": "Base-OC",
    "asp_oc": "ASP-OC",
}

# backbone (ocr_cluster.models.names.BACKBONES) -> the Backbone column
BACKBONE_LABELS = {
    "hrnetv2_w18_small": "HRNetV2p-W18-Small",
    "hrnetv2_w18": "HRNetV2p-W18",
    "hrnetv2_w48": "HRNetV2p-W48",
    "resnet50_d8": "R-50-D8",
    "resnet101_d8": "R-101-D8",
    "resnet50_d16": "R-50-D16",
    "resnet101_d16": "R-101-D16",
}


def method(head: str | None) -> str | None:
    """A head's Method label; an unknown head shows under its own name."""
    return METHOD_LABELS.get(head, head) if head else head


def backbone(name: str | None) -> str | None:
    return BACKBONE_LABELS.get(name, name) if name else name

# dataset (ocr_cluster.config.DATASETS) -> section title, as the seeds' READMEs name them
DATASET_LABELS = {
    "synthetic": "Synthetic",
    "cityscapes": "Cityscapes",
    "ade20k": "ADE20K",
    "voc-aug": "Pascal VOC 2012 + Aug",
    "pascal-context": "Pascal Context",
    "pascal-context-59": "Pascal Context 59",
    "coco-stuff164k": "COCO-Stuff 164k",
    "coco-stuff10k": "COCO-Stuff 10k",
    "lip": "LIP",
}


def dataset(name: str | None) -> str | None:
    return DATASET_LABELS.get(name, name) if name else name


# field -> its display function, for table headers and plot legends
DISPLAY = {"backbone": backbone, "head": method, "dataset": dataset}
