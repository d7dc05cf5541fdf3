"""Real-network examples: Gaussian mixture + MLP, digits and CIFAR-10 with an MLP or ResNet-18."""

from .cifar import CIFAR10DataModule
from .classification import GaussianMixtureDataModule, MLPClassifier
from .resnet import ResNet18
from .vision import DigitsDataModule, ImageClassifier

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "GaussianMixtureDataModule", "ImageClassifier", "MLPClassifier", "ResNet18"]
