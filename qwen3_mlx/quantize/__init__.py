"""Quantization that learns from calibration text: GPTQ (gptq.py), AWQ (awq.py), bits per layer chosen
by measured sensitivity (mixed.py) and scales and biases trained against the float model (dwq.py), each
one pass over the layers with its calibration inputs (capture.py) or one run of training, written by the
converter in mlx-lm's format (calibrated.py).
"""
