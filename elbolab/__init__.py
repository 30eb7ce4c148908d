"""elbolab: variational inference and variational autoencoders on PyTorch."""

__version__ = "0.1.0"
