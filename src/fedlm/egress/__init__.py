"""What leaves the device: the egress hook every transport calls, its refusal, the audit log, and the audit-only
default. Depends on nothing else in fedlm, so transports and privacy policies both build on it."""

from fedlm.egress.audit import AuditLog, AuditRecord, default_audit_path, summarize
from fedlm.egress.hook import AuditOnly, EgressHook, EgressRefused, check_body, serialize

__all__ = [
    "AuditLog",
    "AuditOnly",
    "AuditRecord",
    "EgressHook",
    "EgressRefused",
    "check_body",
    "default_audit_path",
    "serialize",
    "summarize",
]
