"""Database layer: the async engine (:mod:`.engine`), the declarative base (:mod:`.base`) and the
Alembic migrations driver (:mod:`.migrate`). Accounts and audit tables live in ``gateway.auth`` and
``gateway.audit``; this package knows nothing about them.

Security notes: database URLs are shown with the password masked; database exceptions are
translated into the GatewayError tree by the stores that use this package.
"""
