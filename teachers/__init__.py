"""Teacher types and their loaders; every teacher is a ``flowmap.teacher.Teacher``:
``velocity(x, t, cond=None, guidance=1.0)`` on the linear axis."""

from teachers.checkpoints import (
    TEACHER_KINDS,
    CheckpointTeacher,
    TeacherKind,
    describe_teacher,
    load_teacher,
    register_teacher_kind,
)
from teachers.edm import EDMDenoiserTeacher
from teachers.gmm import GaussianMixtureTeacher, PresetMixture, preset_mixture

__all__ = [
    "TEACHER_KINDS",
    "TeacherKind",
    "register_teacher_kind",
    "CheckpointTeacher",
    "EDMDenoiserTeacher",
    "GaussianMixtureTeacher",
    "PresetMixture",
    "describe_teacher",
    "load_teacher",
    "preset_mixture",
]
