"""Data sets that work offline."""

from mochi_retrieval.data.fashion_mnist import FashionMNIST, FashionMNISTNotFoundError, load_fashion_mnist
