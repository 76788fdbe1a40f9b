"""``mailward key import|list|show|remove|revoke|verify|sync``: the encryption key store.

What it does: ``import FILE`` validates one OpenPGP public key (armored or binary) or one S/MIME
certificate (PEM or DER) and records it (:func:`gateway.keys.validate.validate_key`, then
:meth:`gateway.keys.store.SqlKeyStore.import_key`): with ``--address A`` for that address only
(it must be one of the key's), without for every address the key names. ``--source`` says who
supplied it (``operator``, the default, or ``user``), ``--verified`` that the operator vouches it
belongs to those addresses. Importing a stored fingerprint again updates it; importing the revoked
version of a stored key records the revocation. ``list [ADDRESS]`` prints the keys (all, or those
recorded for one address; each with its state now: usable, expired, revoked, not-yet-valid),
``show FPR`` one key (``--armor`` adds the key itself as armored OpenPGP or PEM text), ``remove
FPR`` deletes it, ``revoke FPR`` marks it revoked (for a certificate revoked by its CA, or a key
known to be compromised), ``verify FPR`` marks it verified (``--unverified`` undoes it), ``sync``
rebuilds the gateway-owned GNUPGHOME (``keys.gnupg_home``) from the store (``--rebuild`` from an
empty keyring). FPR is a full fingerprint (40 or 64 hex digits; spaces and colons ignored).

Exit codes: 0 success; 2 bad options, bad configuration, an unreadable FILE or a refused key
(the message names the file and the reason; nothing is stored); 1 an unknown fingerprint, an
unreachable database, a gpg that cannot run.

Every change is an audit event written in the same transaction (kinds ``key-import``,
``key-revoke``, ``key-remove``, ``key-verify``; listener ``cli``; the operator as ``cli:<OS
user>``) and is logged at WARNING (logger ``mailward.keys``).

Reads/writes: the configuration (``database.*``, ``[keys]``), the FILE, the ``encryption_key``
tables, ``audit_record``; ``sync`` writes ``keys.gnupg_home``.

Security notes: only public material is ever stored or printed; a file with any secret key in it
is refused whole. User IDs, subjects and addresses come from key holders and are printed with
control and bidi characters escaped (:func:`gateway.cli.common.printable`); ``--json`` is exact.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.cli import common
from gateway.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, fail, load, operator, printable
from gateway.config import Config
from gateway.core.model import utcnow
from gateway.keys.address import InvalidAddress
from gateway.keys.gpg import GpgProgram
from gateway.keys.gpghome import KeyRing
from gateway.keys.models import KINDS, OPENPGP, OPERATOR, SOURCES, UNVERIFIED, VERIFIED
from gateway.keys.store import KeyNotFound, KeyRecord, SqlKeyStore, normalize_fingerprint
from gateway.keys.validate import KeyLimits, KeyRejected, validate_key

T = TypeVar("T")

log = logging.getLogger("mailward.keys")


def _fingerprint(value: str) -> str:
    try:
        return normalize_fingerprint(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(sub: Any) -> None:
    sub2 = common.add_actions(
        sub, "key", "encryption keys: import, list, show, remove, revoke, verify, sync"
    )

    imp = sub2.add_parser("import", help="import one OpenPGP public key or S/MIME certificate")
    imp.add_argument("file", metavar="FILE", help="armored/binary OpenPGP key, PEM/DER cert")
    imp.add_argument(
        "--address", metavar="A", help="record the key for this address only (one of its own)"
    )
    imp.add_argument(
        "--source",
        choices=SOURCES,
        default=OPERATOR,
        help="who supplied the key (default: operator)",
    )
    imp.add_argument(
        "--verified",
        action="store_true",
        help="the operator vouches that the key belongs to the address(es)",
    )
    imp.set_defaults(func=handle_import)

    lst = sub2.add_parser("list", help="list stored keys")
    lst.add_argument("address", nargs="?", metavar="ADDRESS", help="only keys for this address")
    lst.add_argument("--kind", choices=KINDS, help="only keys of this kind")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.set_defaults(func=handle_list)

    show = sub2.add_parser("show", help="print one key")
    show.add_argument("fingerprint", type=_fingerprint, metavar="FPR", help="full fingerprint")
    show.add_argument("--armor", action="store_true", help="also print the key (armored / PEM)")
    show.add_argument("--json", action="store_true", help="as one JSON object")
    show.set_defaults(func=handle_show)

    for name, helptext, func in (
        ("remove", "delete a key from the store", "remove"),
        ("revoke", "mark a key revoked (it is never used again)", "revoke"),
    ):
        cmd = sub2.add_parser(name, help=helptext)
        cmd.add_argument("fingerprint", type=_fingerprint, metavar="FPR", help="full fingerprint")
        cmd.set_defaults(func=handle_remove if func == "remove" else handle_revoke)

    verify = sub2.add_parser("verify", help="mark a key verified (or --unverified)")
    verify.add_argument("fingerprint", type=_fingerprint, metavar="FPR", help="full fingerprint")
    verify.add_argument("--unverified", action="store_true", help="mark it unverified instead")
    verify.set_defaults(func=handle_verify)

    sync = sub2.add_parser("sync", help="rebuild the gateway's GNUPGHOME from the store")
    sync.add_argument(
        "--rebuild", action="store_true", help="start from an empty keyring (exact material)"
    )
    sync.set_defaults(func=handle_sync)


def _with_store(config: Config, fn: Callable[[SqlKeyStore], Awaitable[T]]) -> T:
    return common.with_store(config, SqlKeyStore, fn)


def _when(value: datetime | None, never: str = "never") -> str:
    return value.isoformat(timespec="seconds") if value is not None else never


def _addresses(record: KeyRecord) -> str:
    return ", ".join(record.addresses) or "-"


def handle_import(args: argparse.Namespace) -> int:
    config = load(args)
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as error:
        return fail(f"{args.file}: cannot read: {error.strerror or error}", EXIT_CONFIG)
    now = utcnow()
    by = operator()

    async def run(store: SqlKeyStore) -> Any:
        key = await validate_key(
            data,
            now=now,
            address=args.address,
            limits=KeyLimits.from_config(config.keys),
            program=GpgProgram.from_config(config.keys),
            allow_revoked=True,
        )
        return await store.import_key(
            key,
            now=now,
            source=args.source,
            imported_by=by,
            verification=VERIFIED if args.verified else None,
        )

    try:
        result = _with_store(config, run)
    except KeyRejected as exc:
        return fail(f"{printable(args.file)}: refused: {printable(exc.reason)}", EXIT_CONFIG)
    record: KeyRecord = result.record
    log.warning(
        "key %s (%s) %s by %s for %s",
        record.fingerprint,
        record.kind,
        result.action,
        by,
        _addresses(record),
    )
    if result.action == "revoked":
        print(f"key {record.fingerprint} ({record.kind}) revoked: it will not be used again")
        return EXIT_OK
    print(
        f"key {record.fingerprint} ({record.kind} {printable(record.algorithm)}) "
        f"{result.action} for {printable(_addresses(record))}; expires "
        f"{_when(record.usable_until)}; source {record.source}, {record.verification}"
    )
    return EXIT_OK


def _listing(now: datetime) -> common.Listing[KeyRecord]:
    """What ``key list`` prints: each key with its state at ``now``."""

    def row(r: KeyRecord) -> tuple[str, ...]:
        return (
            r.fingerprint,
            r.kind,
            r.state(now),
            _when(r.usable_until)[:10] if r.usable_until else "never",
            r.source,
            "yes" if r.verification == VERIFIED else "no",
            _when(r.last_used_at, "-")[:10],
            common.short(_addresses(r), 60),
        )

    return common.Listing(
        header=(
            "FINGERPRINT",
            "KIND",
            "STATE",
            "EXPIRES",
            "SOURCE",
            "VERIFIED",
            "LAST USED",
            "ADDRESSES",
        ),
        row=row,
        to_json=lambda r: {**r.to_dict(), "state": r.state(now)},
        empty="no matching keys",
    )


def handle_list(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        records = _with_store(config, lambda s: s.list(args.address, kind=args.kind))
    except InvalidAddress as exc:
        return fail(f"address {printable(repr(args.address))}: {exc.reason}", EXIT_CONFIG)
    return _listing(utcnow()).print_page(records, as_json=args.json)


def format_key(record: KeyRecord, now: datetime) -> str:
    """The human-readable description of ``key show`` (no key material)."""
    pairs: list[tuple[str, object]] = [
        ("kind", record.kind),
        ("algorithm", record.algorithm),
        ("state", record.state(now)),
        ("created", record.created_at),
        ("expires", _when(record.expires_at)),
    ]
    if record.kind == OPENPGP:
        pairs.append(("encryption until", _when(record.encryption_expires_at)))
    pairs += [
        ("revoked", _when(record.revoked_at, "no") if record.revoked else "no"),
        ("source", record.source),
        ("verification", record.verification),
        ("imported", record.imported_at),
        ("imported by", record.imported_by),
        ("updated", record.updated_at),
        ("last used", record.last_used_at),
        ("sha256", record.material_sha256),
    ]
    lines = [f"key {record.fingerprint}", *common.format_fields(pairs)]
    lines.append(f"  addresses ({len(record.addresses)}):")
    lines += [f"    {printable(a)}" for a in record.addresses]
    label = "user ids" if record.kind == OPENPGP else "subject"
    lines.append(f"  {label} ({len(record.user_ids)}):")
    lines += [f"    {printable(u)}" for u in record.user_ids]
    return "\n".join(lines)


def handle_show(args: argparse.Namespace) -> int:
    record = _with_store(load(args), lambda s: s.get(args.fingerprint))
    if record is None:
        return fail(f"no key {args.fingerprint}", EXIT_FAILURE)
    now = utcnow()
    if args.json:
        data = {**record.to_dict(), "state": record.state(now)}
        if args.armor:
            data["armored"] = record.armored()
        print(json.dumps(data))
        return EXIT_OK
    print(format_key(record, now))
    if args.armor:
        print(record.armored(), end="")
    return EXIT_OK


def _change(
    args: argparse.Namespace, verb: str, fn: Callable[[SqlKeyStore], Awaitable[KeyRecord]]
) -> int:
    config = load(args)
    try:
        record = _with_store(config, fn)
    except KeyNotFound:
        return fail(f"no key {args.fingerprint}", EXIT_FAILURE)
    log.warning("key %s (%s) %s by %s", record.fingerprint, record.kind, verb, operator())
    print(
        f"key {record.fingerprint} ({record.kind}) {verb}; addresses: {printable(_addresses(record))}"
    )
    return EXIT_OK


def handle_remove(args: argparse.Namespace) -> int:
    by = operator()
    return _change(args, "removed", lambda s: s.remove(args.fingerprint, removed_by=by))


def handle_revoke(args: argparse.Namespace) -> int:
    by = operator()
    return _change(
        args, "revoked", lambda s: s.revoke(args.fingerprint, now=utcnow(), revoked_by=by)
    )


def handle_verify(args: argparse.Namespace) -> int:
    by = operator()
    state = UNVERIFIED if args.unverified else VERIFIED
    return _change(
        args,
        f"marked {state}",
        lambda s: s.set_verification(args.fingerprint, state, now=utcnow(), by=by),
    )


def handle_sync(args: argparse.Namespace) -> int:
    config = load(args)
    keyring = KeyRing.from_config(config)

    async def run(store: SqlKeyStore) -> Any:
        records = await store.all_usable_keys(now=utcnow(), kind=OPENPGP)
        return await keyring.sync(records, rebuild=args.rebuild)

    try:
        result = _with_store(config, run)
    except OSError as error:
        return fail(f"{keyring.path}: {error.strerror or error}", EXIT_FAILURE)
    print(
        f"keyring {keyring.path}: {result.imported} usable key(s) imported, "
        f"{len(result.removed)} other key(s) removed"
    )
    return EXIT_OK
