"""Quantization that learns from calibration text: GPTQ (gptq.py), AWQ (awq.py) and bits per layer
chosen by measured sensitivity (mixed.py), each one pass over the layers with its calibration inputs
(capture.py), written by the converter in mlx-lm's format (calibrated.py).
"""
