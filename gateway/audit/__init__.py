"""The audit log: its tables (:mod:`.models`) and the group-commit SQL store implementing
:class:`gateway.core.ports.AuditSink` plus the query API of ``mailward audit`` (:mod:`.store`).

Security notes: the audit never stores message bodies, only size, SHA-256 and Message-ID.
"""
