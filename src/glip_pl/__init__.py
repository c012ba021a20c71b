"""glip_pl: GLIP pretraining, evaluation and inference with PyTorch Lightning."""

__version__ = "0.1.0"
