"""``python -m api``: serve the HTTP API (API_HOST:API_PORT). ``python -m api keys create|revoke|list``, ``openapi``.

``keys create --name clinic-a`` prints the new key once (and, when API_CALLBACK_SECRET is set, the
secret that client verifies callbacks with); the keys file keeps only its SHA-256.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from contract.analyses import callback_secret
from contract.settings import ServiceSettings

from .auth import KeyFile


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the API (the default)")
    commands.add_parser("openapi", help="print the OpenAPI document (docs/openapi.json)")
    keys = commands.add_parser("keys", help="create, revoke or list API keys").add_subparsers(dest="action",
                                                                                               required=True)
    for action, text in (("create", "print a new key for NAME, once"), ("revoke", "revoke NAME's key")):
        sub = keys.add_parser(action, help=text)
        sub.add_argument("--name", required=True)
        sub.add_argument("--file", type=Path, help="keys file (default: API_KEYS_FILE)")
    listing = keys.add_parser("list", help="names, creation and revocation times (never the keys)")
    listing.add_argument("--file", type=Path)
    return parser


def keys_command(args: argparse.Namespace, settings: ServiceSettings) -> int:
    store = KeyFile(args.file or settings.API_KEYS_FILE)
    try:
        if args.action == "create":
            key = store.create(args.name)
            print(f"API key for {args.name} (shown once; store it safely):\n{key}")
            if settings.API_CALLBACK_SECRET is not None:
                secret = callback_secret(settings.API_CALLBACK_SECRET.get_secret_value(), args.name)
                print(f"Callback signing secret for {args.name}:\n{secret}")
        elif args.action == "revoke":
            store.revoke(args.name)
            print(f"revoked {args.name}")
        else:
            for name, entry in sorted(store.read().items()):
                print(f"{name}\tcreated {entry.get('created_at')}\trevoked {entry.get('revoked_at') or '-'}")
    except ValueError as error:
        print(f"python -m api keys {args.action}: {error}", file=sys.stderr)
        return 2
    return 0


def serve(settings: ServiceSettings) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.API_HOST, port=settings.API_PORT,
                log_level=settings.LOG_LEVEL.lower(), proxy_headers=True, server_header=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = ServiceSettings()
    if args.command == "keys":
        return keys_command(args, settings)
    if args.command == "openapi":
        import json

        from .app import create_app

        print(json.dumps(create_app(settings).openapi(), indent=2, ensure_ascii=False))
        return 0
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
