"""Adapters onto the ``Teacher`` protocol (``velocity(x, t, cond=None, guidance=1.0)``)."""

from teachers.checkpoints import CheckpointTeacher, describe_teacher, load_teacher
from teachers.edm import EDMDenoiserTeacher
from teachers.gmm import GaussianMixtureTeacher, PresetMixture, preset_mixture

__all__ = [
    "CheckpointTeacher",
    "EDMDenoiserTeacher",
    "GaussianMixtureTeacher",
    "PresetMixture",
    "describe_teacher",
    "load_teacher",
    "preset_mixture",
]
