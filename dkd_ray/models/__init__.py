"""Teacher and student networks.

- ``build_teacher(cfg.teacher, num_classes) -> ReIDTeacher`` (``teacher.py``), losses in ``reid_losses.py``;
- ``build_student(cfg, num_train_ids) -> PersonSearchNet`` (``student.py``), OIM in ``oim.py``;
- ResNet trunks and weight loading in ``backbone.py``.
"""

from dkd_ray.models.backbone import BackboneWeightsError, build_resnet
from dkd_ray.models.oim import OIMLoss
from dkd_ray.models.reid_losses import (
    BatchHardTripletLoss,
    LabelSmoothingCrossEntropy,
    TeacherCriterion,
)
from dkd_ray.models.student import PersonSearchNet, build_student, labelled_ground_truth
from dkd_ray.models.teacher import ReIDTeacher, build_teacher, teacher_embedding_dim

__all__ = [
    "BackboneWeightsError", "BatchHardTripletLoss", "LabelSmoothingCrossEntropy", "OIMLoss", "PersonSearchNet",
    "ReIDTeacher", "TeacherCriterion", "build_resnet", "build_student", "build_teacher", "labelled_ground_truth",
    "teacher_embedding_dim",
]
