"""Values shared by the shard format, the converters, the transforms and the config's defaults."""

IGNORE_INDEX = 255  # label value of unlabelled pixels, and of the padding around a crop

# mmseg's ImageNet normalisation, on 0-255 pixels in R, G, B order
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
