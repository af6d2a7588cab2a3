"""Relabel: soft labels from one expert or a weighted committee, with BSSL, online or stored per epoch."""

from cvdd.labels.bssl import Teacher, bssl_mode, teacher_weights
from cvdd.labels.plans import EpochPlan, apply_plan, make_plan
from cvdd.labels.stored import LabelSettings, load_shard, relabel_stored

__all__ = [
    "EpochPlan",
    "LabelSettings",
    "Teacher",
    "apply_plan",
    "bssl_mode",
    "load_shard",
    "make_plan",
    "relabel_stored",
    "teacher_weights",
]
