"""What is already in a store folder: resume it, refuse it, repair it or clear it.

    manifest = existing_or_new(folder, settings, identity, tokenizer, overwrite)
    remove_leftovers(folder, len(manifest["shards"]))

A folder's manifest is continued only when the settings hash and the weights fingerprint agree
with this call (a store of other settings or another checkpoint is refused, or cleared with
`overwrite`), after checking it (residtap.store.checks): the shards from the first missing or
damaged one on are dropped, and the run rewrites them as an uninterrupted run would. residtap
deletes only its own files (OUR_FILES).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from residtap.store import manifest as fmt
from residtap.store.checks import check_manifest, check_shard
from residtap.store.lock import LOCK_FILE
from residtap.store.manifest import MANIFEST, read_manifest
from residtap.version import __version__

log = logging.getLogger(__name__)

OUR_FILES = re.compile(
    r"^(manifest\.json|shard-\d{5}\.(safetensors|samples\.jsonl))(\.tmp)?$|^part-\d{5}-of-\d{5}$"
)
PART = re.compile(r"^part-\d{5}-of-\d{5}$")


def existing_or_new(folder: Path, settings: dict, identity: dict, tokenizer, overwrite: bool
                     ) -> dict[str, Any]:
    """The manifest to continue: the folder's own (checked, and cut back to its first missing or
    damaged shard), or a new one. Refuses a store of other settings or other weights unless
    `overwrite`, which clears it."""
    new = {
        "format": fmt.FORMAT, "format_version": fmt.VERSION, "residtap_version": __version__,
        "model": identity, "tokenizer": getattr(tokenizer, "name_or_path", None),
        "sites": {name: {"shape": None, "dtype": None} for name in settings["sites"]},
        "positions": settings["positions"], "settings": settings,
        "settings_hash": fmt.settings_hash(settings), "samples": settings["samples"],
        "shards": [], "rows": 0, "complete": False,
    }
    if not folder.exists() or not any(not PART.match(p.name) and p.name != LOCK_FILE
                                      for p in folder.iterdir()):
        return new
    if not (folder / MANIFEST).is_file():
        raise ValueError(
            f"out {str(folder)!r} is a non-empty folder without {MANIFEST}, so it is not a "
            "residtap store; residtap only deletes its own files, so choose a new or empty folder"
        )
    try:
        old = read_manifest(folder)
        check_manifest(folder, old)
    except ValueError:
        if not overwrite:
            raise
        log.warning("overwriting the damaged store %s", folder)
        _clear(folder)
        return new
    same_weights = _same_weights(folder, old.get("model") or {}, identity)
    if old.get("settings_hash") == new["settings_hash"] and same_weights:
        return _repaired(folder, old)
    if overwrite:
        log.warning("overwriting the store %s (made with other settings or weights)", folder)
        _clear(folder)
        return new
    if old.get("model", {}).get("config_hash") != identity["config_hash"]:
        raise ValueError(
            f"{folder} is a store of another model ({old.get('model', {}).get('name')!r}, "
            f"config hash {old.get('model', {}).get('config_hash')}); this model has config hash "
            f"{identity['config_hash']}. Use another out folder, or overwrite=True (--overwrite) "
            "to replace it"
        )
    if not same_weights:
        raise ValueError(
            f"{folder} is a store made on other weights of this model's config (weights "
            f"fingerprint {old['model'].get('weights_fingerprint')}, this model "
            f"{identity['weights_fingerprint']}: another checkpoint); resuming would mix two "
            "models' activations in one store. Use the checkpoint it was made on, another out "
            "folder, or overwrite=True (--overwrite) to replace it"
        )
    diff = "; ".join(fmt.settings_differences(old.get("settings", {}), settings))
    raise ValueError(
        f"{folder} holds a store made with other settings ({diff}); re-run with the same "
        "settings to resume it, use another out folder, or overwrite=True (--overwrite) to "
        "replace it"
    )


def _same_weights(folder: Path, recorded: dict, identity: dict) -> bool:
    theirs, ours = recorded.get("weights_fingerprint"), identity["weights_fingerprint"]
    if theirs is None or ours is None:
        log.warning("store %s: weights fingerprint %s; resuming after a check of the config "
                    "only", folder, "not recorded (an older store)" if theirs is None
                    else "unknown for this model (meta or tensor-parallel weights)")
        return True
    return theirs == ours


def _repaired(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` cut back to the shards before its first missing or damaged one (which the
    run then rewrites, with every shard after it, as an uninterrupted run would)."""
    for i in range(len(manifest["shards"])):
        try:
            check_shard(folder, manifest, i)
        except (ValueError, FileNotFoundError) as err:
            log.warning("store %s: %s; rewriting shards %d and after", folder, err, i)
            kept = manifest["shards"][:i]
            manifest.update(shards=kept, rows=sum(s["rows"] for s in kept), complete=False)
            break
    return manifest


def _clear(folder: Path) -> None:
    """Delete residtap's own files (shards, manifest, part folders) in `folder`."""
    for path in folder.iterdir():
        if OUR_FILES.match(path.name):
            path.unlink() if path.is_file() else shutil.rmtree(path)


def remove_leftovers(folder: Path, complete: int) -> None:
    """Delete files of shards the manifest does not list (an interrupted run's)."""
    for path in folder.iterdir():
        m = OUR_FILES.match(path.name)
        if not m or path.name.startswith(MANIFEST):
            continue
        if path.name.endswith(".tmp") or int(path.name[6:11]) >= complete:
            log.debug("removing leftover %s", path)
            path.unlink()
