"""Recover: committee selection, voting, BN statistic matching, augmentation, initialisation and the synthesis loop.

The pure-maths building blocks are re-exported here; the synthesis loop lives in :mod:`cvdd.synthesis.recover`.
"""

from cvdd.synthesis.bn_matching import BNMatching, BNStatHook
from cvdd.synthesis.committee import COMMITTEE_POLICIES, select_committee
from cvdd.synthesis.jitter import clamp_to_valid, cosine_lr, recover_augment
from cvdd.synthesis.voting import VOTING_MODES, voter_weights

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
