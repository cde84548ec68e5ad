"""The privacy gate: detect sensitive content, apply the egress policy at one choke point, audit every byte."""

from fedlm.egress import AuditLog, AuditRecord
from fedlm.privacy.detector import DEFAULT_THRESHOLD, SENSITIVE_TYPES, Detector, Entity, Scan
from fedlm.privacy.gate import EgressBlocked, EgressGate
from fedlm.privacy.policy import DEFAULT_POLICY, Policy

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_THRESHOLD",
    "SENSITIVE_TYPES",
    "AuditLog",
    "AuditRecord",
    "Detector",
    "EgressBlocked",
    "EgressGate",
    "Entity",
    "Policy",
    "Scan",
]
