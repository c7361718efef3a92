"""Which published models / seed-table rows each (backbone, head) of the zoo corresponds to.

Torch-free data. Seed files live in shared/seeds/ and are named by their 3-digit prefix:

- 000: openseg-group/mmsegmentation configs/ocrnet/README.md (official mmseg 0.x OCRNet rows plus
  the OCR author's variant and baseline rows);
- 001: sssegmentation docs/modelzoo/ocrnet/README.md;
- 002: open-mmlab/mmsegmentation 1.x configs/ocrnet/README.md;
- 003: openseg.pytorch README.md (its tables carry no numbers);
- 004: OCNet.pytorch README.md.

`exact=True` means the zoo model has the same modules as the code behind that row (the same
parameter count and, for mmseg, the same state_dict keys); `exact=False` marks a close variant
(`note` says what differs). Rows from sources that are not seed files give `seed=""` and cite the
spec section instead.

`MMSEG_REFERENCE_MODELS` lists the 11 mmsegmentation 1.2.2 models of
shared/reference/mmseg_state_dicts.json and the zoo model that reproduces each (tested key by key).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Reference", "REFERENCES", "MMSEG_REFERENCE_MODELS", "DATASET_CLASSES", "references_for"]

DATASET_CLASSES = {"cityscapes": 19, "ade20k": 150, "voc12aug": 21}


@dataclass(frozen=True)
class Reference:
    source: str
    seed: str
    rows: str
    config: str = ""
    exact: bool = True
    note: str = ""


# json key -> (backbone, head, dataset); num_classes from DATASET_CLASSES.
MMSEG_REFERENCE_MODELS: dict[str, tuple[str, str, str]] = {
    "ocrnet_hr18s_cityscapes": ("hrnetv2_w18_small", "ocr", "cityscapes"),
    "ocrnet_hr18_cityscapes": ("hrnetv2_w18", "ocr", "cityscapes"),
    "ocrnet_hr48_cityscapes": ("hrnetv2_w48", "ocr", "cityscapes"),
    "ocrnet_r101-d8_cityscapes": ("resnet101_d8", "ocr", "cityscapes"),
    "ocrnet_hr18_ade20k": ("hrnetv2_w18", "ocr", "ade20k"),
    "ocrnet_hr18_voc12aug": ("hrnetv2_w18", "ocr", "voc12aug"),
    "fcn_hr18_cityscapes": ("hrnetv2_w18", "fcn", "cityscapes"),
    "deeplabv3_r101-d8_cityscapes": ("resnet101_d8", "deeplabv3", "cityscapes"),
    "deeplabv3plus_r101-d8_cityscapes": ("resnet101_d8", "deeplabv3plus", "cityscapes"),
    "fcn_r50-d8_cityscapes": ("resnet50_d8", "fcn", "cityscapes"),
    "isanet_r50-d8_cityscapes": ("resnet50_d8", "isa", "cityscapes"),
}

_MM = "open-mmlab/mmsegmentation"
_MMOS = "openseg-group/mmsegmentation"
_SS = "sssegmentation"
_SS_NOTE = "sssegmentation's OCRNet: aux head 3x3 C->512, 3x3 OCR fusion, dropout 0"
_OS = "openseg.pytorch MODEL_ZOO.md (spec 8.4)"
_OS_NOTE = "openseg: biased convs + InPlaceABN (leaky ReLU), aux conv3x3 1024->512, align_corners=True"


def _mm_hrnet(label: str, cfg: str) -> list[Reference]:
    return [
        Reference(_MM + " 1.x", "002",
                  f"OCRNet {label}: Cityscapes 512x1024 40k/80k/160k; ADE20K 512x512 80k/160k; "
                  f"VOC12+aug 512x512 20k/40k",
                  config=f"ocrnet/ocrnet_{cfg}_4xb2-40k_cityscapes-512x1024.py (and siblings)"),
        Reference(_MM + " 0.x (in " + _MMOS + " README)", "000",
                  f"OCRNet {label}: Cityscapes 40k/80k/160k; ADE20K 80k/160k; VOC12+aug 20k/40k",
                  config=f"ocrnet_{cfg}_512x1024_40k_cityscapes.py (and siblings)"),
    ]


REFERENCES: dict[tuple[str, str], list[Reference]] = {
    ("hrnetv2_w18_small", "ocr"): _mm_hrnet("HRNetV2p-W18-Small", "hr18s") + [
        Reference(_SS, "001", "HRNetV2p-W18-Small: VOC, ADE20k, CityScapes", exact=False, note=_SS_NOTE)],
    ("hrnetv2_w18", "ocr"): _mm_hrnet("HRNetV2p-W18", "hr18") + [
        Reference(_SS, "001", "HRNetV2p-W18: VOC, ADE20k, CityScapes", exact=False, note=_SS_NOTE)],
    ("hrnetv2_w48", "ocr"): _mm_hrnet("HRNetV2p-W48", "hr48") + [
        Reference(_SS, "001", "HRNetV2p-W48: VOC, ADE20k, CityScapes", exact=False, note=_SS_NOTE),
        Reference("HRNet-Semantic-Segmentation README (spec 8.3)", "", "HRNetV2-W48 + OCR, all datasets",
                  exact=False, note="HRNet-OCR: biased aux/pre-OCR convs (fold into BN), dropout 0.05, "
                                    "align_corners=True"),
        Reference(_OS, "", "HRNet-W48 + OCR", exact=False, note=_OS_NOTE)],
    ("hrnetv2_w48", "ocr_dropout"): [
        Reference(_MMOS, "000", "OCRNet (w/ dropout) | HRNetV2p-W48 | 512x1024 | 80000 and 160000",
                  config="configs/ocrnet/ocrnet_hr48_512x1024_80k_b8_cityscapes.py",
                  note="train with align_corners=True as that config")],
    ("hrnetv2_w48", "fcn"): [
        Reference(_MMOS, "000", "FCN | HRNetV2p-W48 | 512x1024 | 16 | 80000",
                  config="configs/ocrnet/fcn_hr48_512x1024_80k_b16_cityscapes.py")],
    ("hrnetv2_w18", "fcn"): [
        Reference(_MM, "", "FCN HRNetV2p-W18 (configs/hrnet, not a seed table)",
                  config="hrnet/fcn_hr18_4xb2-40k_cityscapes-512x1024.py")],
    ("resnet50_d8", "fcn"): [
        Reference(_MM, "", "FCN R-50-D8 (configs/fcn, not a seed table)",
                  config="fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py")],
    ("resnet50_d8", "isa"): [
        Reference(_MM, "", "ISANet R-50-D8 (configs/isanet, not a seed table)",
                  config="isanet/isanet_r50-d8_4xb2-40k_cityscapes-512x1024.py")],
    ("resnet101_d8", "isa"): [
        Reference(_OS, "", "ISA | R-101-D8 | Cityscapes 40k b8", exact=False,
                  note="openseg ISA: value conv without bias, W = conv + BNReLU, dropout 0.05")],
    ("resnet50_d8", "ocr"): [
        Reference(_MMOS, "000", "OCRNet | R-50-D8 | 512x1024 | 8 | 40000; ADE20K OCRNet | R-50-D8 | 160000",
                  config="ocrnet_r50-d8_512x1024_40k_cityscapes.py"),
        Reference(_SS, "001", "R-50-D8: VOC, ADE20k, CityScapes", exact=False, note=_SS_NOTE)],
    ("resnet101_d8", "ocr"): [
        Reference(_MM + " 1.x", "002", "OCRNet | R-101-D8 | 512x1024 | 8 | 40000; 16 | 40000; 16 | 80000",
                  config="ocrnet/ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024.py (and 8xb2 siblings)"),
        Reference(_MMOS, "000",
                  "OCRNet | R-101-D8 | 512x1024 | b8 40k/60k/80k, b16 40k/80k; 769x769 b8 40k; "
                  "OCRNet + RMI | R-101-D8 (RMI loss); ADE20K OCRNet | R-101-D8 | b16 160k, b32 80k",
                  config="configs/ocrnet/ocrnet_r101-d8_512x1024_*_cityscapes.py"),
        Reference(_SS, "001", "R-101-D8: VOC, ADE20k, CityScapes", exact=False, note=_SS_NOTE),
        Reference(_OS, "", "OCR | R-101-D8 | Cityscapes 40k b8", exact=False, note=_OS_NOTE)],
    ("resnet101_d8", "ocr_sepconv"): [
        Reference(_MMOS, "000",
                  "OCRNet (replace the 1x1 Conv (fusion) with 3x3 SepDepthWiseConv) | R-101-D8 | 8 | 40000",
                  config="configs/_base_/models/ocrnet_sep_r50-d8.py (use_sep_conv=True, fcd3fb2)")],
    ("resnet101_d8", "ocrplus"): [
        Reference(_MMOS, "000", "OCRNetPlus | R-101-D8 | 512x1024 | 8 | 40000",
                  config="configs/_base_/models/ocrnetplus_r50-d8.py", exact=False,
                  note="head version behind this row is ambiguous: plain-ConvModule OCRPlusHead assumed")],
    ("resnet101_d8", "ocrplus_sepdecoder"): [
        Reference(_MMOS, "000",
                  "OCRNetPlus (Decoder w/ SepDepthWiseConv) | R-101-D8 | b8 40k/60k/80k, b16 40k/60k; "
                  "ADE20K b16 160k",
                  config="configs/_base_/models/ocrnetplus_r50-d8.py (use_sep_conv=False)")],
    ("resnet101_d16", "ocrplus_sepdecoder"): [
        Reference(_MMOS, "000", "OCRNetPlus | R-101-D16 | 512x1024 | 16 | 80000",
                  config="configs/_base_/models/ocrnetplus_r50-d16.py (use_sep_conv=False)", exact=False,
                  note="the row says plain 'OCRNetPlus'; its config at 07e0caf is the separable decoder")],
    ("resnet101_d8", "ocrplus_sepconv"): [
        Reference(_MMOS, "000",
                  "OCRNetPlus (OCR & Decoder w/ SepDepthWiseConv) | R-101-D8 | b8 40k/60k, b16 40k/60k; "
                  "OCRNet+ | R-101-D8 | 16 | 40000/80000; ADE20K b16 160k",
                  config="use_sep_conv=True (fcd3fb2)")],
    ("resnet101_d8", "deeplabv3"): [
        Reference(_MMOS, "000",
                  "DeepLabV3 | R-101-D8 | 769x769 b8 40k; 512x1024 b8 80k, b16 40k/60k/80k; ADE20K b16 160k",
                  config="deeplabv3_r101-d8_512x1024_*_cityscapes.py"),
        Reference(_MM, "", "DeepLabV3 R-101-D8 (configs/deeplabv3, not a seed table)",
                  config="deeplabv3/deeplabv3_r101-d8_4xb2-40k_cityscapes-512x1024.py")],
    ("resnet101_d8", "deeplabv3_sepconv"): [
        Reference(_MMOS, "000", "DeepLabv3 (w/ SepDepthWiseConv) | R-101-D8 | 512x1024 | 16 | 40000",
                  config="configs/_base_/models/deeplabv3_sep_r50-d8.py (c1_in_channels=0)")],
    ("resnet101_d8", "deeplabv3plus"): [
        Reference(_MMOS, "000",
                  "DeepLabV3+ | R-101-D8 | 512x1024 b8 40k/80k, b16 40k/60k/80k; 769x769 b8 80k; "
                  "ADE20K b16 160k",
                  config="deeplabv3plus_r101-d8_512x1024_*_cityscapes.py"),
        Reference(_MM, "", "DeepLabV3+ R-101-D8 (configs/deeplabv3plus, not a seed table)",
                  config="deeplabv3plus/deeplabv3plus_r101-d8_4xb2-40k_cityscapes-512x1024.py")],
    ("resnet101_d16", "deeplabv3plus"): [
        Reference(_MMOS, "000", "DeepLabv3+ | R-101-D16 | 512x1024 | 16 | 80000",
                  config="configs/ocrnet/deeplabv3plus_r101-d16_512x1024_80k_b16_cityscapes.py",
                  note="ASPP rates (6, 12, 18) at stride 16 assumed")],
    ("resnet101_d8", "base_oc"): [
        Reference("OCNet.pytorch README", "004", "run_base_oc.sh: ~79.3 val (Cityscapes, R-101)", exact=False,
                  note="OCNet.pytorch: 128-ch deep stem, no dilation contraction, shared key/query"),
        Reference(_OS, "", "Base-OC | R-101-D8 | Cityscapes 40k b8", exact=False, note=_OS_NOTE)],
    ("resnet101_d8", "asp_oc"): [
        Reference("OCNet.pytorch README", "004", "run_asp_oc.sh: ~79.5 val (Cityscapes, R-101)", exact=False,
                  note="OCNet.pytorch: 128-ch deep stem, no dilation contraction, value 256")],
    ("resnet101_d8", "asp_ocr"): [
        Reference(_OS, "", "ASP-OCR | R-101-D8 | Cityscapes 40k b8", exact=False, note=_OS_NOTE)],
}


def references_for(backbone: str, head: str) -> list[Reference]:
    return list(REFERENCES.get((backbone, head), []))
