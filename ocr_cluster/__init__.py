"""ocr_cluster: OCRNet semantic segmentation trained and swept on Ray and SLURM clusters."""

__version__ = "0.1.0"
