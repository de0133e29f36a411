"""Resolve a model or dataset name to something loadable, failing fast and clearly when the hub is out of reach."""

from __future__ import annotations

import glob
import os


class HubUnreachableError(RuntimeError):
    """A hub id was given but neither the cache nor the network can provide it."""


class ModelFolderError(FileNotFoundError):
    """A model folder (given, or the cached snapshot of a hub id) that lacks files its loader reads."""


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


def check_model_folder(folder: str, needs: dict[str, tuple[str, ...]], holds: str, config_key: str, name: str) -> None:
    """Raise ModelFolderError naming the folder, what is missing and what it should hold (`holds`). `needs` maps a
    part to glob patterns inside the folder, any one of which provides it. Checked before loading: an empty folder
    otherwise fails deep in diffusers ("no file named config.json") or, for a tokenizer, loads with 2 tokens."""
    if not os.path.isdir(folder):
        raise ModelFolderError(f"{config_key} '{folder}' is a file, not a folder: pass a folder that holds {holds}")
    missing = [
        part for part, patterns in needs.items() if not any(glob.glob(os.path.join(folder, p)) for p in patterns)
    ]
    if not missing:
        return
    problem = "is empty" if not os.listdir(folder) else f"lacks {', '.join(missing)}"
    if os.path.abspath(name) != os.path.abspath(folder):  # a hub id, resolved to the cache's snapshot of it
        fix = f"the hub cache holds an incomplete copy of '{name}': download it again or pass a complete folder"
    else:
        fix = "pass a complete folder"
    raise ModelFolderError(f"{config_key} folder '{folder}' {problem}: it should hold {holds}; {fix} as {config_key}")
