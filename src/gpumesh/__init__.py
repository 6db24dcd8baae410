"""gpumesh: federated GPUs from many suppliers as one Kubernetes mesh for Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpumesh")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
