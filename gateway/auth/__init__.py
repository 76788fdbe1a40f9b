"""Accounts: argon2id password hashing (:mod:`.passwords`), the account tables (:mod:`.models`) and
the SQL account store used by SMTP AUTH and ``mailward user`` (:mod:`.store`).

Security notes: passwords are never logged or stored, only their argon2id hashes; see each module.
"""
