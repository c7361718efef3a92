"""`python -m ocr_cluster.train CONFIG [--set k=v ...]`, the entry `ray job submit` runs."""

import sys

from ocr_cluster.train import phases

phases.mark("driver_main")

from ocr_cluster.cli import main  # noqa: E402

sys.exit(main(["train", *sys.argv[1:]], prog="python -m ocr_cluster.train"))
