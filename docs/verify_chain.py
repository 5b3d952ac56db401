#!/usr/bin/env python3
"""Reference verifier of the casf-verifier audit chain, Python standard library only.

It recomputes every row's hash from the stored columns with the canonical
JSON rules published in docs/audit-format.md, checks each row links to the
previous one, and optionally checks a file of signed checkpoints (that each
checkpointed hash is still at its id, with as many events up to it, and that
the chain reaches the last one). It agrees with `casf-verifier audit verify`
and needs nothing from it.

The standard library has no Ed25519: checkpoint signatures are checked only
when the `cryptography` package is importable and --public-key is given;
otherwise they are reported as NOT checked (verify them with openssl, see
docs/audit-format.md).

    python3 verify_chain.py --sqlite data/casf-audit.db
    python3 verify_chain.py --psql "$PG_DSN"          # runs psql -At (read-only)
    python3 verify_chain.py --rows export.jsonl       # rows exported with psql, see below
    python3 verify_chain.py --sqlite FILE --checkpoints cp.jsonl [--public-key pub.pem]
    python3 verify_chain.py --vectors docs/audit-vectors.json

Exit 0: valid; 1: broken chain or failed checkpoint; 2: cannot read the input.

A PostgreSQL export for --rows (one JSON object a line):

    psql -X -At -d "$PG_DSN" -c "SELECT json_build_object('id', id, 'request_id', request_id,
      'event_id', event_id::text, 'ts', ts, 'actor', actor, 'action', action,
      'decision', decision, 'payload', payload::text, 'prev_hash', prev_hash,
      'hash', hash) FROM audit_events ORDER BY id" > export.jsonl
"""

import argparse
import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import urllib.parse

COLUMNS = ("request_id", "event_id", "ts", "actor", "action", "decision")
EXPORT_SQL = (
    "SELECT json_build_object('id', id, 'request_id', request_id, "
    "'event_id', event_id::text, 'ts', ts, 'actor', actor, 'action', action, "
    "'decision', decision, 'payload', payload::text, 'prev_hash', prev_hash, "
    "'hash', hash) FROM audit_events ORDER BY id"
)


class Unparsable(ValueError):
    """A payload that the canonical rules do not read: hashed as a JSON string."""


# ---------------------------------------------------------------- canonical JSON

def _parse_int(text):
    # "-0" is a double (negative zero, written 0.0); integers beyond 64 bits
    # are read as the nearest double, as most JSON parsers (and serde_json) do.
    if text == "-0":
        return -0.0
    n = int(text)
    if -(2**63) <= n < 2**64:
        return n
    try:
        return float(n)
    except OverflowError as error:
        raise Unparsable(str(error)) from error


def _parse_float(text):
    f = float(text)
    if math.isinf(f):
        raise Unparsable("number beyond the doubles")
    return f


def _parse_constant(name):
    raise Unparsable(f"{name} is not JSON")


def parse(text):
    return json.loads(
        text,
        parse_int=_parse_int,
        parse_float=_parse_float,
        parse_constant=_parse_constant,
    )


def _float(f):
    if f == 0:
        return "0.0"
    if f.is_integer() and abs(f) < 2**64:
        return f"{int(f)}.0"
    text = repr(f)  # shortest round-trip digits, e.g. 1.5e-07, 1e+20, 0.1
    sign = "-" if text.startswith("-") else ""
    text = text.lstrip("-")
    mantissa, _, exp = text.partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    zeros = len(digits) - len(digits.lstrip("0"))
    digits = digits[zeros:].rstrip("0") or "0"
    # Decimal exponent of the first significant digit.
    e = len(whole) + int(exp or 0) - zeros - 1
    if -5 <= e <= 15:
        if e >= 0:
            body = digits[: e + 1].ljust(e + 1, "0") + "." + (digits[e + 1:] or "0")
        else:
            body = "0." + "0" * (-e - 1) + digits
    else:
        point = "." + digits[1:] if len(digits) > 1 else ""
        body = f"{digits[0]}{point}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + body


def _string(s):
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate from a \ud800 escape
        raise Unparsable("not UTF-8 text") from error
    # Escapes exactly ", \ and U+0000-U+001F (\b \t \n \f \r short).
    return json.dumps(s, ensure_ascii=False)


def canonical(value):
    """The canonical JSON text of a parsed value (docs/audit-format.md)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items())  # by code point
        return "{" + ",".join(_string(k) + ":" + canonical(v) for k, v in items) + "}"
    raise Unparsable(f"unexpected {type(value).__name__}")


def canonical_payload(text):
    """The canonical text of a stored payload; text that does not parse is
    hashed as a JSON string, so its row fails rather than the whole read."""
    try:
        return canonical(parse(text))
    except (Unparsable, ValueError, RecursionError):
        return json.dumps(text, ensure_ascii=False)


def row_hash(row):
    text = "".join(row[c] for c in COLUMNS) + canonical_payload(row["payload"]) + row["prev_hash"]
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- reading rows

def sqlite_rows(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cursor = conn.execute(
            "SELECT id, request_id, event_id, ts, actor, action, decision, payload, "
            "prev_hash, hash FROM audit_events ORDER BY id"
        )
        names = [d[0] for d in cursor.description]
        for values in cursor:
            yield dict(zip(names, values))
    finally:
        conn.close()


def jsonl_rows(lines):
    for line in lines:
        line = line.strip()
        if line:
            yield json.loads(line)


def psql_rows(dsn):
    # A URL's password goes to psql through PGPASSWORD, not its command
    # line, which other users of the host can read.
    env = dict(os.environ)
    url = urllib.parse.urlsplit(dsn)
    if url.scheme in ("postgres", "postgresql") and url.password is not None:
        env["PGPASSWORD"] = urllib.parse.unquote(url.password)
        host = url.netloc.rsplit("@", 1)[1]
        user = url.username or ""
        dsn = urllib.parse.urlunsplit(url._replace(netloc=f"{user}@{host}" if user else host))
    process = subprocess.Popen(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", EXPORT_SQL],
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
    )
    yield from jsonl_rows(process.stdout)
    if process.wait() != 0:
        raise OSError(f"psql exited with {process.returncode}")


# ---------------------------------------------------------------- the walk

class Chain:
    def __init__(self, watch=()):
        self.count = 0
        self.last_id = None
        self.last_hash = None
        self.first_break = None
        self.watch = set(watch)
        self.seen = {}  # id -> (count up to it, hash)

    def push(self, row):
        self.count += 1
        expected_prev = self.last_hash or ""
        if self.first_break is None:
            if row["prev_hash"] != expected_prev:
                self.first_break = (row, "prev_hash does not match the previous event's hash")
            elif row_hash(row) != row["hash"]:
                self.first_break = (
                    row,
                    "hash does not match the recomputed hash of the stored columns",
                )
        if row["id"] in self.watch:
            self.seen[row["id"]] = (self.count, row["hash"])
        self.last_id = row["id"]
        self.last_hash = row["hash"]


def read_checkpoints(path):
    checkpoints = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                doc = json.loads(line)
                if doc.get("type") != "casf-audit-checkpoint" or doc.get("version") != 1:
                    raise ValueError(f"{path} line {number}: not a checkpoint")
                checkpoints.append((number, doc))
    if not checkpoints:
        raise ValueError(f"{path} holds no checkpoint")
    return checkpoints


def signature_checker(public_key_path):
    """A function that checks a checkpoint's signature, or None when the
    `cryptography` package is missing (the standard library has no Ed25519)."""
    if not public_key_path:
        return None
    try:
        import base64

        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        return None
    with open(public_key_path, "rb") as f:
        key = load_pem_public_key(f.read())

    def check(doc):
        unsigned = {k: v for k, v in doc.items() if k != "signature"}
        try:
            key.verify(base64.b64decode(doc["signature"]), canonical(unsigned).encode("utf-8"))
            return None
        except Exception:  # InvalidSignature, a missing or malformed signature
            return "its signature does not verify with the given key"

    return check


def check_checkpoints(checkpoints, chain, check_signature):
    failures = []
    for number, doc in checkpoints:
        last_id, last_hash, count = doc["last_id"], doc["last_hash"], doc["count"]
        name = f"checkpoint at line {number} (id {last_id}, {count} events, {doc.get('time')})"
        reason = check_signature(doc) if check_signature else None
        if reason is None and last_id > 0:
            if last_id not in chain.seen:
                if chain.last_id is None:
                    reason = "the chain is empty: it was truncated or replaced"
                elif chain.last_id >= last_id:
                    reason = f"the chain has no event with id {last_id}: it was deleted"
                else:
                    reason = (
                        f"the chain ends at id {chain.last_id} ({chain.count} events), "
                        "before it: its tail was cut off"
                    )
            else:
                seen_count, seen_hash = chain.seen[last_id]
                if seen_hash != last_hash:
                    reason = (
                        f"event id {last_id} has hash {seen_hash}, the checkpoint signed "
                        f"{last_hash}: the chain up to it was rewritten or replaced"
                    )
                elif seen_count != count:
                    reason = (
                        f"the chain holds {seen_count} events up to id {last_id}, "
                        f"the checkpoint signed {count}"
                    )
        if reason:
            failures.append(f"{name} fails: {reason}")
    return failures


def check_vectors(path):
    with open(path, encoding="utf-8") as f:
        vectors = json.load(f)
    failed = 0
    for vector in vectors["canonical"] + vectors["unparsable"]:
        got = canonical_payload(vector["input"])
        if got != vector["canonical"]:
            failed += 1
            print(f"vector {vector['input']!r}: got {got!r}, expected {vector['canonical']!r}")
    for vector in vectors["chain"]:
        row = dict(vector["columns"])
        if row_hash(row) != vector["hash"]:
            failed += 1
            print(f"chain vector: got {row_hash(row)}, expected {vector['hash']}")
    total = len(vectors["canonical"]) + len(vectors["unparsable"]) + len(vectors["chain"])
    print(f"vectors: {total - failed} of {total} agree")
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sqlite", metavar="FILE", help="the SQLite audit file")
    source.add_argument("--psql", metavar="DSN", help="a PostgreSQL DSN, read with psql -At")
    source.add_argument("--rows", metavar="FILE", help="rows exported as JSON lines (- for stdin)")
    source.add_argument("--vectors", metavar="FILE", help="check docs/audit-vectors.json")
    parser.add_argument("--checkpoints", metavar="FILE", help="a checkpoint file to check")
    parser.add_argument("--public-key", metavar="PEM", help="checkpoints' key (needs cryptography)")
    args = parser.parse_args(argv)

    if args.vectors:
        return check_vectors(args.vectors)
    try:
        checkpoints = read_checkpoints(args.checkpoints) if args.checkpoints else []
        check_signature = signature_checker(args.public_key)
        chain = Chain(doc["last_id"] for _, doc in checkpoints)
        if args.sqlite:
            rows = sqlite_rows(args.sqlite)
        elif args.psql:
            rows = psql_rows(args.psql)
        elif args.rows == "-":
            rows = jsonl_rows(sys.stdin)
        else:
            rows = jsonl_rows(open(args.rows, encoding="utf-8"))
        for row in rows:
            chain.push(row)
    except (OSError, ValueError, KeyError, sqlite3.Error) as error:
        print(f"verify_chain: cannot read the audit trail: {error}", file=sys.stderr)
        return 2

    code = 0
    if chain.first_break is None:
        print(f"chain valid: {chain.count} events, last hash {chain.last_hash or '-'}")
    else:
        row, reason = chain.first_break
        print(f"chain broken at event id {row['id']} (event_id {row['event_id']}): {reason}")
        code = 1
    if checkpoints:
        failures = check_checkpoints(checkpoints, chain, check_signature)
        for failure in failures:
            print(failure)
        if failures:
            code = 1
        else:
            print(f"checkpoints hold: {len(checkpoints)} checked")
        if check_signature is None:
            print(
                "checkpoint signatures NOT checked (no --public-key, or no `cryptography`: "
                "the standard library has no Ed25519); check them with openssl"
            )
    return code


if __name__ == "__main__":
    sys.exit(main())
