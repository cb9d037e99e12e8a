"""Models from the Hugging Face Hub: `org/name[@revision][:QUANT]` into a file or folder in the HF cache.

The spec (what the user types after --model, or LLM(model=...)):

    org/name                   the repo's default branch (main)
    org/name@REVISION          a branch, tag or commit hash (a cached commit may be given by a prefix)
    org/name:QUANT             a GGUF repo's file by its quantization label, case-insensitive: Q4_K_M, q8_0, F16
    org/name@REVISION:QUANT    both; git forbids ':' in ref names, so the last ':' always starts the label
    org/name:FILE.gguf         a GGUF file by its name, when labels do not tell two files apart

`hf.co/` or `https://huggingface.co/` in front is allowed. A repo with config.json and *.safetensors weights
downloads as a Hugging Face folder (config, generation config, tokenizer and chat template files, the weights:
the shards that model.safetensors.index.json names); otherwise it must hold GGUF files, of which exactly one
is downloaded: the one the label names, the only one, or, with several and no label, Q4_K_M as llama.cpp's
`-hf` picks (else the error lists the labels). A label also picks a GGUF in a repo that has both kinds.
Split GGUFs (-00001-of-0000N.gguf) are refused: jisu reads single-file GGUFs.

Files land in huggingface_hub's own cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) with its progress
bars. Offline (HF_HUB_OFFLINE=1, or the Hub unreachable) a cached model is used as it is; everything else ends
in a ModelLoadError that names the repo and what to do. huggingface_hub is imported only when a hub id is
resolved: it costs half a second that local models should not pay.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jisu.errors import ModelLoadError

__all__ = ["HubSpec", "choose_files", "gguf_label", "hub_error", "parse_hub_spec", "resolve_hub_model"]

INDEX_FILE = "model.safetensors.index.json"
# Everything besides the weights that jisu reads from a Hugging Face folder (hf_folder.py).
FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's `-hf org/name` picks when a repo has several GGUFs

Progress = Callable[[int, int, str], None]

# Hub repo ids: namespace/name of letters, digits, '-', '_', '.' (at most 96 characters each).
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_REPO_RE = re.compile(rf"{_PART}/{_PART}")
_SPEC_RE = re.compile(r"(?P<repo>[^@:]+)(?:@(?P<rev>[^:]*))?(?::(?P<quant>[^:]*))?")
_QUANT_RE = re.compile(r"[A-Za-z0-9_.+-]+")
_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
# Names that are files, not repos: `foo/bar.gguf` that does not exist is a missing path.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth", ".jinja")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# A quantization label inside a GGUF file name: Q4_K_M, IQ3_XXS, Q8_0, UD-Q4_K_XL, TQ1_0, F16, BF16, MXFP4.
_LABEL_RE = re.compile(
    r"(?<![a-z0-9])((?:ud-)?(?:i?q\d(?:_[a-z0-9]+)*|tq\d_\d|bf16|fp?16|fp?32|mxfp4(?:_moe)?))(?![a-z0-9])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class HubSpec:
    """A parsed `org/name[@revision][:quant]`."""

    repo_id: str
    revision: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.quant}" if self.quant else "")


def parse_hub_spec(text: str) -> HubSpec | None:
    """The hub id in `text`, or None when `text` does not have the org/name form (then it is a local path).

    Raises ModelLoadError for an org/name with an empty or malformed @revision or :label, which is surely
    meant as a hub id. Call this only for text that is not an existing local path: a local path always wins.
    """
    text = text.strip()
    for prefix in _HUB_PREFIXES:
        if text.lower().startswith(prefix):
            text = text[len(prefix):]
            break
    m = _SPEC_RE.fullmatch(text)
    if m is None:
        return None
    repo, rev, quant = m["repo"].rstrip("/"), m["rev"], m["quant"]
    if not _REPO_RE.fullmatch(repo) or "--" in repo or ".." in repo or repo.lower().endswith(_FILE_SUFFIXES):
        return None
    if rev is not None and (not rev or rev != rev.strip() or rev.startswith("/") or ".." in rev):
        raise ModelLoadError(
            f"{text!r}: the revision after '@' should be a branch, tag or commit hash, e.g. {repo}@main"
        )
    if quant is not None and not _QUANT_RE.fullmatch(quant):
        raise ModelLoadError(
            f"{text!r}: the label after ':' should name a GGUF quantization, e.g. {repo}:{DEFAULT_QUANT}"
        )
    return HubSpec(repo, rev or None, quant or None)


def resolve_hub_model(spec: HubSpec | str, progress: Progress | None = None) -> Path:
    """The local path of `spec`'s model (a folder with config.json, or one GGUF file), downloaded if needed.

    progress(done, total, what), if given, receives the download's progress in MiB instead of
    huggingface_hub's own progress bars on stderr (the CLI shows it in its own progress display).
    """
    if isinstance(spec, str):
        parsed = parse_hub_spec(spec)
        if parsed is None:
            raise ModelLoadError(f"{spec!r} is not a Hugging Face Hub id; expected org/name[@revision][:QUANT]")
        spec = parsed
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return _from_cache(spec, why="offline")
    try:
        files = _remote_files(spec)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes a ModelLoadError below
        if _is_revision_not_found(e) or not _is_hub_failure(e):
            raise hub_error(e, spec) from None
        # As huggingface_hub does: when the Hub cannot answer, a cached copy is good enough.
        cached = _cached_snapshot(spec)
        if cached is not None:
            return _from_cache(spec, why="unreachable")
        raise hub_error(e, spec) from None
    choice = choose_files(spec, files)
    try:
        return _download(spec, choice, progress)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, spec) from None


# ----------------------------------------------------------------------------- choosing files


@dataclass(frozen=True)
class Choice:
    """What to fetch: a Hugging Face folder (its files, the index's shards added at download) or one GGUF."""

    kind: str  # "folder" or "gguf"
    files: tuple[str, ...]


def choose_files(spec: HubSpec, files: list[str]) -> Choice:
    """Which of the repo's `files` jisu needs for `spec` (see the module docstring for the rules)."""
    top = {f for f in files if "/" not in f}
    weights = sorted(f for f in top if f.endswith(".safetensors"))
    is_folder = "config.json" in top and bool(weights)
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.rsplit("/", 1)[-1].lower())
    if is_folder and spec.quant is None:
        if INDEX_FILE in top:
            weights = [INDEX_FILE]  # the shards it names are added once it is downloaded
        elif "model.safetensors" in top:
            weights = ["model.safetensors"]
        return Choice("folder", tuple(f for f in FOLDER_FILES if f in top) + tuple(weights))
    if not ggufs:
        if spec.quant is not None and is_folder:
            raise ModelLoadError(
                f"{spec.repo_id} has no GGUF files for the label :{spec.quant} to pick; drop the label to load its "
                f"safetensors weights ({spec.repo_id})"
            )
        listing = ", ".join(sorted(files)[:12]) + (", ..." if len(files) > 12 else "") if files else "no files"
        hint = ""
        if "config.json" in top and any(f.endswith(".bin") for f in top):
            hint = "; its weights are PyTorch .bin files, and jisu reads only safetensors"
        raise ModelLoadError(
            f"{spec} holds neither a Hugging Face model (config.json and *.safetensors weights) nor a GGUF file "
            f"({listing}){hint}"
        )
    return Choice("gguf", (_pick_gguf(spec, ggufs),))


def gguf_label(filename: str) -> str:
    """The quantization label in a GGUF file's name (Q4_K_M, F16, ...), upper-cased; else the file name."""
    name = filename.rsplit("/", 1)[-1]
    stem = _SPLIT_RE.sub("", name)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    found = _LABEL_RE.findall(stem)
    return found[-1].upper() if found else name


def _pick_gguf(spec: HubSpec, ggufs: list[str]) -> str:
    labels = sorted({gguf_label(f) for f in ggufs})
    if spec.quant is not None:
        matches = _matching(spec.quant, ggufs)
        if not matches:
            raise ModelLoadError(
                f"{spec.repo_id} has no GGUF file for the label {spec.quant!r}; its labels: {', '.join(labels)} "
                f"(pick one as {spec.repo_id}:LABEL)"
            )
    elif len(_split_sets(ggufs)) == 1:
        matches = ggufs
    else:
        matches = _matching(DEFAULT_QUANT, ggufs)
        if not matches:
            raise ModelLoadError(
                f"{spec.repo_id} has {len(ggufs)} GGUF files and none is {DEFAULT_QUANT}, the default; pick one "
                f"by its label as {spec.repo_id}:LABEL, one of: {', '.join(labels)}"
            )
    sets = _split_sets(matches)
    if len(sets) > 1:
        raise ModelLoadError(
            f"{spec} matches {len(sets)} GGUF files ({', '.join(sorted(sets))}); name one as "
            f"{spec.repo_id}{'@' + spec.revision if spec.revision else ''}:FILE.gguf"
        )
    (first, parts), = sets.items()
    if len(parts) > 1 or _SPLIT_RE.search(first):
        n = _SPLIT_RE.search(first)
        total = int(n.group(2)) if n else len(parts)
        others = [lab for lab in labels if lab != gguf_label(first)]
        raise ModelLoadError(
            f"{spec.repo_id}: {first} is part of a GGUF split into {total} files, and jisu reads single-file GGUFs; "
            f"merge the parts with llama.cpp's `llama-gguf-split --merge` and pass the merged file"
            + (f", or pick another label: {', '.join(others)}" if others else "")
        )
    return first


def _matching(quant: str, ggufs: list[str]) -> list[str]:
    q = quant.lower()
    exact = [f for f in ggufs if f.lower() == q or f.rsplit("/", 1)[-1].lower() == q]
    if exact:
        return exact
    by_label = [f for f in ggufs if gguf_label(f).lower() == q]
    if by_label:
        return by_label
    # The label as a token of the path: q4_k matches neither q4_k_m nor iq4_k.
    token = re.compile(rf"(?<![a-z0-9]){re.escape(q)}(?![a-z0-9_])")
    return [f for f in ggufs if token.search(f.lower()[:-5])]


def _split_sets(ggufs: list[str]) -> dict[str, list[str]]:
    """First file of each GGUF (a split GGUF's parts grouped under its -00001-of-N file) -> its files."""
    sets: dict[str, list[str]] = {}
    for f in sorted(ggufs):
        m = _SPLIT_RE.search(f)
        key = f[: m.start()] if m else f
        sets.setdefault(key, []).append(f)
    return {parts[0]: parts for parts in sets.values()}


# ----------------------------------------------------------------------------- the Hub


def _remote_files(spec: HubSpec) -> list[str]:
    """The repo's file list: model_info's siblings, one request (list_repo_files retries for half a minute
    when the network is down; snapshot_download lists again once this answered)."""
    from huggingface_hub import HfApi, constants

    info = HfApi().model_info(spec.repo_id, revision=spec.revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    return [s.rfilename for s in info.siblings or []]


def _download(spec: HubSpec, choice: Choice, progress: Progress | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    bar = _progress_tqdm(progress, f"downloading {spec.repo_id} (MiB)")
    if choice.kind == "gguf":
        path = hf_hub_download(spec.repo_id, choice.files[0], revision=spec.revision, tqdm_class=bar)
        return Path(path)
    files = list(choice.files)
    if INDEX_FILE in files:
        index = Path(hf_hub_download(spec.repo_id, INDEX_FILE, revision=spec.revision, tqdm_class=bar))
        files += _shards_in_index(spec, index)
    folder = snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=[_literal(f) for f in files],
                               tqdm_class=bar)
    return Path(folder)


def _shards_in_index(spec: HubSpec, index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{spec.repo_id}: cannot read {INDEX_FILE} ({index}): {e}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{spec.repo_id}: {INDEX_FILE} has no weight_map")
    shards = [name for name in dict.fromkeys(weight_map.values()) if isinstance(name, str)]
    bad = [s for s in shards if "/" in s or "\\" in s or s.startswith(".")]
    if bad:
        raise ModelLoadError(f"{spec.repo_id}: {INDEX_FILE} names weight files outside the model folder: {bad[:3]}")
    return shards


def _literal(name: str) -> str:
    """`name` as an fnmatch pattern (allow_patterns) that matches only itself."""
    return re.sub(r"([*?\[\]])", r"[\1]", name)


def _progress_tqdm(progress: Progress | None, what: str) -> Any:
    """A tqdm class that reports to progress(done_MiB, total_MiB, what) and draws nothing; None without progress."""
    if progress is None:
        return None
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Null(io.TextIOBase):
        def write(self, s: str) -> int:
            return len(s)

    class _ToCallback(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Downloads keep two bars: bytes received (name ".transfer") and bytes written; report the second.
            name, desc = str(kwargs.get("name") or ""), str(kwargs.get("desc") or "")
            self._report = not name.endswith(".transfer") and desc != "Downloading bytes"
            self._done = int(kwargs.get("initial") or 0)
            kwargs["disable"] = False
            kwargs["file"] = _Null()
            # With HF_HUB_DISABLE_PROGRESS_BARS tqdm still turns itself off, hence the count of our own.
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            self._done += int(n or 0)
            if self._report:
                progress(self._done >> 20, int(self.total or 0) >> 20, what)
            return out

    return _ToCallback


# ----------------------------------------------------------------------------- the cache


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _repo_folder(repo_id: str) -> Path:
    return _cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _cached_refs(storage: Path) -> list[str]:
    refs = storage / "refs"
    try:
        return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())
    except OSError:
        return []


def _cached_snapshot(spec: HubSpec) -> Path | None:
    """The cache's snapshot folder for spec's revision (default main), or None if it is not cached."""
    storage = _repo_folder(spec.repo_id)
    snapshots = storage / "snapshots"
    rev = spec.revision or "main"
    commit: str | None = None
    if _COMMIT_RE.fullmatch(rev):
        commit = rev
    else:
        ref = storage / "refs" / rev
        try:
            if ref.is_file():
                commit = ref.read_text(encoding="utf-8").strip()
        except OSError:
            commit = None
        if commit is None and re.fullmatch(r"[0-9a-f]{7,39}", rev) and snapshots.is_dir():
            found = [p for p in snapshots.iterdir() if p.name.startswith(rev)]
            if len(found) == 1:
                commit = found[0].name
    if not commit or "/" in commit or commit.startswith("."):
        return None
    folder = snapshots / commit
    return folder if folder.is_dir() else None


def _local_files(folder: Path) -> list[str]:
    try:
        return sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts
        )
    except OSError as e:
        raise ModelLoadError(f"cannot list the cached model folder {folder}: {e.strerror or e}") from None


def _from_cache(spec: HubSpec, why: str) -> Path:
    folder = _cached_snapshot(spec)
    if folder is None:
        raise ModelLoadError(_not_cached_message(spec, why))
    choice = choose_files(spec, _local_files(folder))
    return folder if choice.kind == "folder" else folder / choice.files[0]


def _download_command(spec: HubSpec) -> str:
    cmd = f"hf download {spec.repo_id}"
    if spec.revision:
        cmd += f" --revision {spec.revision}"
    if spec.quant:
        cmd += f' --include "*{spec.quant}*.gguf"'
    return cmd


def _not_cached_message(spec: HubSpec, why: str) -> str:
    storage = _repo_folder(spec.repo_id)
    if storage.is_dir() and spec.revision:
        refs = _cached_refs(storage)
        what = f"{spec.repo_id} is in the Hugging Face cache ({_cache_dir()}) but not at revision {spec.revision!r}" + (
            f" (cached: {', '.join(refs)})" if refs else ""
        )
    else:
        what = f"{spec} is neither a local path nor in the Hugging Face cache ({_cache_dir()})"
    if why == "offline":
        return (
            f"{what}, and downloads are off (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE to let jisu download it, "
            f"or download it first with `{_download_command(spec)}`"
        )
    return f"{what}, and the Hugging Face Hub cannot be reached; check the network, or download it first with " \
           f"`{_download_command(spec)}`"


# ----------------------------------------------------------------------------- errors


def _is_revision_not_found(e: BaseException) -> bool:
    from huggingface_hub.errors import RevisionNotFoundError

    return isinstance(e, RevisionNotFoundError)


def _is_network_error(e: BaseException) -> bool:
    """A connection failure, time-out or proxy error (httpx's transport errors, or the OS's)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(
        c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
        and c.__name__ in ("TransportError", "RequestError", "ConnectionError", "Timeout")
        for c in type(e).__mro__
    )


def _is_hub_failure(e: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(e, HfHubHTTPError) or _is_network_error(e)


def hub_error(e: BaseException, spec: HubSpec) -> ModelLoadError:
    """The ModelLoadError to raise for huggingface_hub's exception `e` while fetching `spec`."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = spec.repo_id
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, ModelLoadError):
        return e
    if isinstance(e, GatedRepoError):
        return ModelLoadError(
            f"{repo} is a gated model: accept its terms at https://huggingface.co/{repo} with your Hugging Face "
            f"account, then {login} (a token with read access) so jisu can download it"
        )
    if isinstance(e, RepositoryNotFoundError):
        return ModelLoadError(
            f"{repo} was not found on the Hugging Face Hub; check the name (org/name, as in "
            f"https://huggingface.co/{repo}), and if the repo is private, {login}"
        )
    if isinstance(e, RevisionNotFoundError):
        return ModelLoadError(
            f"{repo} has no revision {spec.revision!r} on the Hugging Face Hub; give a branch, tag or full commit "
            f"hash that exists (see https://huggingface.co/{repo}/tree/main), or drop @{spec.revision}"
        )
    if isinstance(e, DisabledRepoError):
        return ModelLoadError(f"{repo} has been disabled on the Hugging Face Hub; it cannot be downloaded")
    if isinstance(e, OfflineModeIsEnabled):
        return ModelLoadError(_not_cached_message(spec, "offline"))
    if isinstance(e, LocalEntryNotFoundError):  # unreachable Hub (or offline) and not in the cache
        return ModelLoadError(_not_cached_message(spec, "unreachable"))
    if isinstance(e, EntryNotFoundError):
        return ModelLoadError(f"{spec}: a file jisu needs is missing from the repo on the Hub ({_first_line(e)})")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            what = f"access to {repo} was refused (HTTP {status}); {login} with a token that can read it"
        elif status == 429:
            what = f"the Hugging Face Hub is rate-limiting requests (HTTP 429); wait a minute, or {login}"
        elif isinstance(status, int) and status >= 500:
            what = f"the Hugging Face Hub failed (HTTP {status}); try again later"
        else:
            what = f"the Hugging Face Hub answered {_first_line(e)}"
        return ModelLoadError(f"cannot download {spec}: {what}")
    if _is_network_error(e):
        return ModelLoadError(
            f"cannot reach the Hugging Face Hub to download {spec} ({type(e).__name__}: {_first_line(e)}), and it "
            f"is not in the cache ({_cache_dir()}); check the network connection (and HF_ENDPOINT or proxy "
            f"settings), or set HF_HUB_OFFLINE=1 to use only cached models"
        )
    if isinstance(e, OSError):
        return ModelLoadError(
            f"cannot download {spec} into the Hugging Face cache ({_cache_dir()}): {e.strerror or _first_line(e)}; "
            f"free some space or point HF_HUB_CACHE at a writable folder"
        )
    if isinstance(e, ValueError):  # huggingface_hub's validation of the repo id or revision
        return ModelLoadError(f"{spec} is not a valid Hugging Face Hub id: {_first_line(e)}")
    return ModelLoadError(f"cannot download {spec} from the Hugging Face Hub: {type(e).__name__}: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

