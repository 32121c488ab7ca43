"""SAEs on the Hugging Face Hub by name: `hf://ORG/REPO[/SUBFOLDER][@REVISION]` -> a folder in the local HF cache.

`parse_hub_name` reads and checks a name (pure). `download_sae_folder` fetches the folder with
`huggingface_hub.snapshot_download`, which keeps it in the Hugging Face cache (HF_HUB_CACHE / HF_HOME) and
answers from that cache without the network once it is there (HF_HUB_OFFLINE=1, or no connection), then checks
that the folder is an SAE folder; `sae.load` reads it exactly as a local folder.

huggingface_hub loads its submodules lazily, so importing it here is cheap (measured on the 2-core machine with two
jobs running: `import huggingface_hub` 0.03-0.06 s, with `huggingface_hub.errors` and its HTTP client 0.12-0.21 s
alone and ~0.05 s of `import sae`); `snapshot_download` and `HfApi` (~0.2 s more) load only when a name is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath

import huggingface_hub
from huggingface_hub import errors as hub_errors

from sae.errors import SAEConfigError, SAEDataError
from sae.io import CFG_FILENAME, WEIGHTS_FILENAME, WORKBENCH_TENSORS_FILENAME

HUB_PREFIX = "hf://"
SAE_FILES = (CFG_FILENAME, WEIGHTS_FILENAME)
"""What makes a folder an SAE folder (a workbench one also has workbench_state.safetensors, checked by sae.load)."""

ROOT_PATTERNS = ("*.json", "*.jsonl", "*.md", WEIGHTS_FILENAME, WORKBENCH_TENSORS_FILENAME)
"""What `hf://ORG/REPO` downloads: the root's SAE files and every small text file, never the weights of
subfolders (a repo of many SAEs is not fetched whole; the small files show which subfolders hold one)."""

_PART = r"[A-Za-z0-9_.-]+"
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
_FORM = "hf://ORG/REPO[/SUBFOLDER][@REVISION]"


@dataclass(frozen=True)
class HubName:
    """A parsed hub name: the repo, an optional folder inside it, an optional branch, tag or commit."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{sub}{rev}"

    @property
    def allow_patterns(self) -> list[str]:
        """snapshot_download's allow_patterns: the subfolder's files, or the root's (ROOT_PATTERNS)."""
        return [f"{self.subfolder}/*"] if self.subfolder else list(ROOT_PATTERNS)

    def download_command(self) -> str:
        """The `hf download` command that puts this folder in the cache."""
        rev = f" --revision {self.revision}" if self.revision else ""
        include = f" --include '{self.subfolder}/*'" if self.subfolder else ""
        return f"hf download {self.repo_id}{rev}{include}"


def check_repo_id(repo_id: str, what: str = "repo") -> str:
    """An ORG/NAME repo id by the Hub's rules (huggingface_hub.utils.validate_repo_id, ASCII only): two parts of
    letters, digits, '-', '_', '.', each starting with a letter or digit and not ending in '-' or '.', no '--' or
    '..', not ending in '.git', at most 96 characters. Returns it; a SAEConfigError says what is wrong."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise SAEConfigError(f"{what} {repo_id!r} must be ORG/NAME (an organisation or user, a slash, a repo name).")
    for part in parts:
        if not _REPO_PART.fullmatch(part):
            raise SAEConfigError(
                f"{what} {repo_id!r}: {part!r} may hold only letters, digits, '-', '_' and '.', and must start with "
                "a letter or digit and not end with '-' or '.'."
            )
    if "--" in repo_id or ".." in repo_id or repo_id.endswith(".git") or len(repo_id) > 96:
        raise SAEConfigError(f"{what} {repo_id!r}: the Hub refuses '--', '..', a '.git' ending and over 96 characters.")
    return repo_id


def parse_hub_name(text: str) -> HubName:
    """`hf://ORG/REPO[/SUBFOLDER][@REVISION]` -> HubName; every malformed name is one SAEConfigError."""
    if not isinstance(text, str) or not text.startswith(HUB_PREFIX):
        raise SAEConfigError(f"{text!r} is not a hub name: write {_FORM}.")
    body, at, revision = text[len(HUB_PREFIX):].partition("@")
    if at and not _REVISION.fullmatch(revision):
        raise SAEConfigError(
            f"{text!r}: the revision after '@' must be a branch, tag or commit (letters, digits, '-', '_', '.', '/'), "
            f"got {revision!r}."
        )
    if at and ".." in revision:
        raise SAEConfigError(f"{text!r}: a revision cannot contain '..'.")
    parts = body.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SAEConfigError(f"{text!r} names no repo: write {_FORM}, e.g. hf://my-org/my-sae.")
    repo_id = check_repo_id("/".join(parts[:2]), what=f"{text!r}: repo")
    folders = parts[2:]
    if any(not p for p in folders):
        raise SAEConfigError(f"{text!r}: the subfolder has an empty part (a doubled or trailing '/').")
    for part in folders:
        if not re.fullmatch(_PART, part) or part in (".", ".."):
            raise SAEConfigError(
                f"{text!r}: subfolder part {part!r} may hold only letters, digits, '-', '_' and '.' (not '.' or '..')."
            )
    return HubName(repo_id, "/".join(folders) or None, revision if at else None)


def hub_name_of(path: str | PurePath) -> str | None:
    """The hub name `path` stands for, or None for a local path. A string must start with hf://; a Path built from
    one reads hf:/ (Path collapses '//'), which counts when no such local path exists."""
    if isinstance(path, str):
        return path if path.startswith(HUB_PREFIX) else None
    if isinstance(path, PurePath):
        text = path.as_posix()
        if text.startswith("hf:/") and not text.startswith(HUB_PREFIX) and not Path(path).exists():
            return HUB_PREFIX + text[len("hf:/"):]
    return None


def is_connection_error(exc: BaseException) -> bool:
    """A network failure: offline mode (huggingface_hub's OfflineModeIsEnabled is a ConnectionError), a socket
    error or timeout, or the HTTP client's TransportError (httpx2 in huggingface_hub 2.x, httpx in 1.x; known by
    class name, so no HTTP client is imported here)."""
    return isinstance(exc, (ConnectionError, TimeoutError)) or any(
        cls.__name__ == "TransportError" for cls in type(exc).__mro__
    )


def download_sae_folder(name: str | HubName) -> Path:
    """The local folder (in the Hugging Face cache) of hub SAE `name`, downloaded if it is not cached yet.

    Raises SAEConfigError for a bad name, an unknown repo or revision, or a folder without cfg.json and
    sae_weights.safetensors (naming what is there); SAEDataError when it is not cached and the Hub cannot be
    reached (HF_HUB_OFFLINE=1 or no network).
    """
    hub = parse_hub_name(name) if isinstance(name, str) else name
    folder = download_folder(hub)
    missing = [f for f in SAE_FILES if not (folder / f).is_file()]
    if missing:
        inside = [HubName(hub.repo_id, _join(hub.subfolder, sub), hub.revision) for sub in sae_folders_in(folder)]
        hint = f"; SAE folders inside: {', '.join(map(str, inside))}" if inside else ""
        where = "" if hub.subfolder else " (the repo's root)"
        raise SAEConfigError(f"{hub}{where} is not an SAE folder: {_missing(missing)}; it holds "
                             f"{describe_contents(folder)}{hint}")
    return folder


def download_folder(hub: HubName) -> Path:
    """The local copy (in the Hugging Face cache) of the files `hub` names (its subfolder, or ROOT_PATTERNS),
    downloaded if not cached; every Hub problem is one SAEConfigError or SAEDataError (see download_sae_folder)."""
    try:
        snapshot = Path(huggingface_hub.snapshot_download(
            hub.repo_id, revision=hub.revision, allow_patterns=hub.allow_patterns, library_name="sae-workbench",
        ))
    except hub_errors.LocalEntryNotFoundError as exc:  # IncompleteSnapshotError (2.x) too: a partial copy
        partly = "only partly" if type(exc).__name__ == "IncompleteSnapshotError" else "not"
        raise SAEDataError(
            f"{hub} is {partly} in the local Hugging Face cache and HF_HUB_OFFLINE=1 (or no network): connect once, "
            f"or download it with `{hub.download_command()}`"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise SAEConfigError(
            f"{hub}: revision {hub.revision!r} is not a branch, tag or commit of {hub.repo_id} on the Hub."
        ) from None
    except hub_errors.GatedRepoError:
        raise SAEConfigError(
            f"{hub}: {hub.repo_id} is gated; accept its conditions on huggingface.co and log in (`hf auth login` or "
            "HF_TOKEN)."
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise SAEConfigError(
            f"{hub}: no model repo {hub.repo_id} on the Hub (or it is private: log in with `hf auth login` or set "
            "HF_TOKEN)."
        ) from None
    except hub_errors.HfHubHTTPError as exc:
        raise SAEDataError(f"{hub}: the Hub answered {first_line(exc)}") from None
    except Exception as exc:
        if is_connection_error(exc):
            raise SAEDataError(f"{hub}: cannot reach the Hub ({type(exc).__name__}: {first_line(exc)})") from None
        raise
    return snapshot / hub.subfolder if hub.subfolder else snapshot


def check_sae_folder(folder: Path) -> None:
    """A local `folder` holds cfg.json and sae_weights.safetensors; else one SAEConfigError naming what it holds."""
    if not folder.is_dir():
        raise SAEConfigError(f"{folder} is not a folder.")
    missing = [f for f in SAE_FILES if not (folder / f).is_file()]
    if missing:
        raise SAEConfigError(
            f"{folder} is not an SAE folder: {_missing(missing)}; it holds {describe_contents(folder)}"
        )


def describe_contents(folder: Path) -> str:
    """'README.md, layer_3/, layer_5/': a folder's files and subfolders (hidden ones left out), sorted."""
    if not folder.is_dir():
        return "nothing (no such folder)"
    entries = [f"{p.name}/" if p.is_dir() else p.name for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    return ", ".join(entries) if entries else "nothing"


def sae_folders_in(folder: Path) -> list[str]:
    """Relative paths of the folders below `folder` that hold a cfg.json, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.parent.relative_to(folder).as_posix() for p in folder.rglob(CFG_FILENAME) if p.parent != folder)


def _join(base: str | None, sub: str) -> str:
    return f"{base}/{sub}" if base else sub


def _missing(names: list[str]) -> str:
    return f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} missing"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (huggingface_hub's run over several), or its class name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
