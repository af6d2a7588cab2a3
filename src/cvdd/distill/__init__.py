"""Recover: committee selection, voting, BN statistic matching, augmentation, initialisation and the synthesis loop.

The pure-maths building blocks are re-exported here; the synthesis loop lives in :mod:`cvdd.distill.recover`.
"""

from cvdd.distill.bn_matching import BNMatching, BNStatHook
from cvdd.distill.committee import COMMITTEE_POLICIES, select_committee
from cvdd.distill.jitter import clamp_to_valid, cosine_lr, recover_augment
from cvdd.distill.voting import VOTING_MODES, voter_weights

__all__ = [
    "COMMITTEE_POLICIES",
    "VOTING_MODES",
    "BNMatching",
    "BNStatHook",
    "clamp_to_valid",
    "cosine_lr",
    "recover_augment",
    "select_committee",
    "voter_weights",
]
