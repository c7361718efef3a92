"""Names of the backbones and heads the model zoo builds.

Kept free of torch imports so that config validation and the CLI start fast.
"""

BACKBONES = (
    "hrnetv2_w18_small",
    "hrnetv2_w18",
    "hrnetv2_w48",
    "resnet50_d8",
    "resnet101_d8",
    "resnet50_d16",
    "resnet101_d16",
)

HEADS = (
    "ocr",                 # mmseg OCRNet: FCN soft-region head (aux 0.4) cascaded into the OCR head
    "ocr_dropout",         # openseg-group/mmsegmentation "OCRNet (w/ dropout)"
    "ocr_sepconv",         # OCR with 3x3 SepDepthWiseConv pre-OCR conv and fusion (use_sep_conv=True)
    "ocrplus",             # OCRNetPlus: OCR head + DeepLabV3+-style decoder, plain 3x3 ConvModules
    "ocrplus_sepdecoder",  # OCRNetPlus, decoder (and pre-OCR conv) w/ SepDepthWiseConv
    "ocrplus_sepconv",     # OCRNetPlus, OCR & decoder w/ SepDepthWiseConv
    "asp_ocr",             # openseg ASP-OCR
    "fcn",
    "deeplabv3",
    "deeplabv3_sepconv",   # DeepLabV3 + SepDepthWiseConv (openseg-group/mmsegmentation baseline)
    "deeplabv3plus",
    "isa",
    "base_oc",             # OCNet Base-OC
    "asp_oc",              # OCNet ASP-OC
)
