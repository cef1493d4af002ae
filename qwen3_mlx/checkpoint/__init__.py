"""Checkpoints: loading (a folder, a Hub id, mlx-lm's format), converting and quantizing by rounding,
and the sampling defaults a checkpoint's generation_config gives.
"""
