"""Data: toy 2-D sets, scikit-learn digits, image folders / CIFAR-10 as files, and a registry of named sets.

Every dataset item is ``(x, y)`` with y the class index (long) or -1 for unconditional data.
"""

from flowmap.data.digits import load_digits_tensors
from flowmap.data.images import (
    CIFAR10_CLASSES,
    ImageFolderDataset,
    UInt8ImageDataset,
    cifar10_dataset,
    load_image,
    load_npz_images,
    model_to_uint8,
    uint8_to_model,
    write_image_folder,
)
from flowmap.data.registry import (
    DATASETS,
    DataSource,
    SampledSource,
    get_dataset,
    load_tensor_file,
    register_dataset,
    register_sampler,
    tensor_source,
)
from flowmap.data.toy2d import (
    CHECKERBOARD,
    TOY_SETS,
    Checkerboard,
    sample_checkerboard,
    sample_eight_gaussians,
    sample_rings,
    sample_spirals,
    sample_toy,
    sample_two_moons,
)

__all__ = [
    "CHECKERBOARD",
    "CIFAR10_CLASSES",
    "DATASETS",
    "TOY_SETS",
    "Checkerboard",
    "DataSource",
    "ImageFolderDataset",
    "SampledSource",
    "UInt8ImageDataset",
    "cifar10_dataset",
    "get_dataset",
    "load_digits_tensors",
    "load_image",
    "load_npz_images",
    "load_tensor_file",
    "model_to_uint8",
    "register_dataset",
    "register_sampler",
    "sample_checkerboard",
    "sample_eight_gaussians",
    "sample_rings",
    "sample_spirals",
    "sample_toy",
    "sample_two_moons",
    "tensor_source",
    "uint8_to_model",
    "write_image_folder",
]
