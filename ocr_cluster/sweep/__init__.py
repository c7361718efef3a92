"""Sweeps: grid expansion, Ray Tune and submitit/SLURM backends."""
