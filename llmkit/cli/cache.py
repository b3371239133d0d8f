"""``llmkit cache info|clear``: what ``$LLMKIT_CACHE`` holds, and removing it.

Like ``pip cache info`` / ``pip cache purge`` and ``huggingface-cli scan-cache`` /
``delete-cache``. The prepare cache (cleaned documents, :mod:`llmkit.core.cache`) is also
bounded by ``LLMKIT_CACHE_MAX_GB`` (least recently used entries removed after each write);
GGUF conversions (``$LLMKIT_CACHE/gguf``) are listed and removed only with ``--gguf``.
Imports nothing heavy (``llmkit --help`` stays fast).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import typer

from llmkit.cli._common import user_errors
from llmkit.errors import UserError

app = typer.Typer(
    name="cache",
    help="Show or clear llmkit's cache ($LLMKIT_CACHE, default ~/.cache/llmkit).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhm]?)\s*$")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "": 86400.0}


def parse_age(text: str) -> float:
    """Seconds in an age such as ``7d``, ``12h``, ``30m`` or ``7`` (days).

    Raises:
        UserError: any other text.
    """
    from llmkit.errors import UserError

    m = _AGE.match(text)
    if not m:
        raise UserError(
            f"--older-than {text!r} is not an age", "give days (7 or 7d), hours (12h) or minutes"
        )
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def _root() -> Path | None:
    """The cache root (None: caching is off).

    Raises:
        UserError: ``$LLMKIT_CACHE`` names a file (prepare warns and runs uncached; here there
            is nothing to show or clear, and "0 entries" would hide the mistake).
    """
    from llmkit.core.cache import ENV_CACHE, cache_root

    root = cache_root()
    if root is not None and root.exists() and not root.is_dir():
        raise UserError(
            f"{ENV_CACHE}={root} is a file, not a cache directory",
            f"set {ENV_CACHE} to a directory (default ~/.cache/llmkit), or {ENV_CACHE}=off",
        )
    return root


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _gguf_entries(root: Path) -> list:
    from llmkit.core.cache import CacheEntry, _tree_size

    base = root / "gguf"
    if not base.is_dir():
        return []
    out = []
    for child in sorted(base.iterdir()):
        if child.is_dir() and not child.is_symlink():
            out.append(CacheEntry(child, _tree_size(child), child.stat().st_mtime, True))
    return out


@app.command("info")
@user_errors
def info_command(
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON."),
) -> None:
    """The cache's place, its size, its bound and each prepare entry (least recently used
    first)."""
    from llmkit.core.cache import ENV_MAX_GB, cache_entries, max_cache_bytes

    root = _root()
    if root is None:
        typer.echo("the cache is off (LLMKIT_CACHE=off)")
        return
    entries = cache_entries(root)
    gguf = _gguf_entries(root)
    bound = max_cache_bytes()
    report = {
        "root": str(root),
        "max_bytes": bound,
        "prepare": {
            "entries": len(entries),
            "bytes": sum(e.size_bytes for e in entries),
            "items": [
                {
                    "path": str(e.path),
                    "bytes": e.size_bytes,
                    "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(e.last_used)),
                    "complete": e.complete,
                }
                for e in entries
            ],
        },
        "gguf": {"entries": len(gguf), "bytes": sum(e.size_bytes for e in gguf)},
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    limit = "no bound" if bound is None else f"bound {bound / 1e9:g} GB ({ENV_MAX_GB})"
    typer.echo(f"cache: {root}")
    typer.echo(
        f"prepare: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
        f"{_mb(report['prepare']['bytes'])}; {limit}"
    )
    for item in report["prepare"]["items"]:
        flag = "" if item["complete"] else "  (incomplete)"
        typer.echo(f"  {item['last_used']}  {_mb(item['bytes']):>12}  {item['path']}{flag}")
    typer.echo(f"gguf conversions: {len(gguf)}, {_mb(report['gguf']['bytes'])}")


@app.command("clear")
@user_errors
def clear_command(
    older_than: str | None = typer.Option(
        None,
        "--older-than",
        help="Only entries last used more than this long ago: days (7 or 7d), hours (12h), "
        "minutes (30m).",
    ),
    gguf: bool = typer.Option(
        False, "--gguf", help="Also remove the cached conversions of GGUF models."
    ),
) -> None:
    """Remove the prepare cache's entries (all, or the old ones with --older-than)."""
    from llmkit.core.cache import cache_entries, remove_entries

    cutoff = None if older_than is None else time.time() - parse_age(older_than)
    root = _root()
    if root is None:
        typer.echo("the cache is off (LLMKIT_CACHE=off): nothing to clear")
        return
    entries = cache_entries(root) + (_gguf_entries(root) if gguf else [])
    now = time.time()
    victims = [
        e
        for e in entries
        if (cutoff is None or e.last_used < cutoff)
        # an incomplete entry touched in the last hour may be a prepare running now
        and (e.complete or now - e.last_used > 3600)
    ]
    removed, freed = remove_entries(victims)
    kept = len(entries) - removed
    typer.echo(
        f"removed {removed} entr{'y' if removed == 1 else 'ies'} ({_mb(freed)}) from {root}; "
        f"{kept} kept"
    )


def register(root_app: typer.Typer) -> None:
    """Add the ``cache`` command group to ``root_app``."""
    root_app.add_typer(app, name="cache")
