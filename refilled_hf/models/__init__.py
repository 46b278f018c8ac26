"""refilled-hf's timm models. Importing this package registers them with timm."""

from .cifar_wrn import CIFAR100_MEAN, CIFAR100_STD, CifarWideResNet

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CifarWideResNet"]
