"""fsam: sharpness-aware training (SGD, SAM, ASAM, Friendly-SAM) as a library and an experiment suite."""

__version__ = "0.1.0"
