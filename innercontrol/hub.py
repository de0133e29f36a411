"""Resolve a model or dataset name to something loadable, failing fast and clearly when the hub is out of reach."""

from __future__ import annotations

import os


class HubUnreachableError(RuntimeError):
    """A hub id was given but neither the cache nor the network can provide it."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model(name_or_path: str, what: str = "model", config_key: str = "model.pretrained_model") -> str:
    """Return a local folder for a hub id or local path; a missing hub id raises HubUnreachableError at once."""
    if os.path.exists(name_or_path):
        return name_or_path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{what} path '{name_or_path}' does not exist; pass an existing folder as {config_key}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        pass
    hint = (
        f"download it where the hub is reachable (`hf download {name_or_path} --local-dir DIR`), copy DIR here "
        f"and pass {config_key}=DIR"
    )
    if hub_offline():
        raise HubUnreachableError(f"{what} '{name_or_path}' is not in the local cache and HF_HUB_OFFLINE=1; {hint}")
    try:
        return snapshot_download(name_or_path, etag_timeout=5)
    except Exception as err:
        raise HubUnreachableError(
            f"the hub is unreachable for {what} '{name_or_path}' ({type(err).__name__}); {hint}"
        ) from None


def resolve_file(repo_id: str, filename: str, what: str, config_key: str) -> str:
    """Return a local path for `filename` of hub repo `repo_id` (cache first), or raise HubUnreachableError."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, local_files_only=True)
    except Exception:
        pass
    hint = (
        f"download {filename} from the hub repository {repo_id} where the hub is reachable "
        f"(`hf download {repo_id} {filename} --local-dir DIR`) and pass {config_key}=DIR/{filename}"
    )
    if hub_offline():
        raise HubUnreachableError(f"{what} '{repo_id}/{filename}' is not cached and HF_HUB_OFFLINE=1; {hint}")
    try:
        return hf_hub_download(repo_id, filename, etag_timeout=5)
    except Exception as err:
        raise HubUnreachableError(
            f"the hub is unreachable for {what} '{repo_id}/{filename}' ({type(err).__name__}); {hint}"
        ) from None
