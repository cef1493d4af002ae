"""Several ranks under mlx.launch: the options and entry points, the wire format of a request, and
the engine that runs a batch on every rank in step.
"""
