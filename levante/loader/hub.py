"""Models from the Hugging Face Hub, through `huggingface_hub` and its cache.

Names: ``org/name`` or ``org/name@revision`` (branch, tag or commit) for a safetensors repo;
for a GGUF repo ``org/name:Q4_K_M`` picks the file whose name carries that quantization
(llama.cpp's ``-hf`` convention; without a tag Q4_K_M, else the only or first file) and
``org/name:file.gguf`` (or ``--gguf-file``) names the file exactly.

Only what the model needs is downloaded: config, tokenizer and chat template, processor
and sentence-transformers files, and the safetensors the index names (or the one GGUF file).
Files land in the Hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``), which `huggingface_hub`
resumes after an interrupted download. ``HF_HUB_OFFLINE=1`` uses the cache alone;
``HF_TOKEN`` opens private and gated repos; ``HF_ENDPOINT`` names another Hub. These are read
when a model is resolved (not when the library was imported), and every failure is one line
that says what to do.

Whatever a Hub (or a mirror, or whoever sits on a plain-http one) answers, downloads stay inside
the cache: huggingface_hub names folders and files after the commit hash and the ETags it is
sent, and does not check them (2.5), so levante does, before anything is written. The commit of
the model's info must be 40 hex digits, and every response's `X-Repo-Commit` too; the `ETag` and
`X-Linked-Etag` of its metadata answers must be plain tokens (checked by an event hook on
huggingface_hub's HTTP client, `check_hub_response`); a revision the user names may not climb
out of `refs/`, and every file asked for is a plain relative path. Each file then lands in the
snapshot folder of that one commit, or the download is refused.
"""
from __future__ import annotations

import functools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from levante.errors import ModelLoadError

# A repo id as the Hub allows it: owner/name, letters, digits, '-', '_', '.'.
_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[^:@\s]+))?"
                   r"(?::(?P<tag>[^:@\s/]+))?$")
# A branch, tag or commit as a user names it: no `..` part, no absolute path (checked in _revision).
_REVISION = re.compile(r"^[A-Za-z0-9_][\w./-]{0,254}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# An ETag as huggingface_hub keeps it (quotes and W/ dropped): the blob's file name in the cache.
_ETAG = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
DOWNLOAD_WORKERS = 8
DEFAULT_GGUF_TAG = "Q4_K_M"
# Files a safetensors model may read beside its weights.
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
              "vocab.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
              "processor_config.json", "modules.json", "config_sentence_transformers.json",
              "sentence_bert_config.json", "model.safetensors.index.json"]
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class HubName:
    repo_id: str
    revision: str | None = None
    tag: str | None = None  # a GGUF quantization (Q4_K_M) or an exact .gguf file name

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.tag}" if self.tag else "")


def parse_hub_name(name: str) -> HubName | None:
    """The Hub name in `name`, or None when it cannot be one (then it is a path or an alias)."""
    if name.startswith((".", "/", "~")) or os.sep != "/" and os.sep in name:
        return None
    match = _NAME.match(name)
    if match is None or ".." in match["repo"]:
        return None
    return HubName(match["repo"], _revision(match["rev"], name), match["tag"])


def _revision(revision: str | None, name: str) -> str | None:
    """A revision that names a file under the cache's refs/ folder, as git refs are named."""
    if revision is None:
        return None
    parts = revision.split("/")
    if not _REVISION.match(revision) or any(part in ("", ".", "..") or part.endswith(".lock") for part in parts):
        raise ModelLoadError(f"'{name}': '{revision}' is not a branch, tag or commit name")
    return revision


def with_gguf_file(model: str, gguf_file: str | None) -> str:
    """`--gguf-file NAME` folded into the model name (``org/name:NAME``)."""
    if not gguf_file:
        return model
    hub = parse_hub_name(model)
    if hub is None:
        raise ModelLoadError(f"--gguf-file picks a file of a Hub repo, but '{model}' is not a Hub name (org/name)")
    if hub.tag:
        raise ModelLoadError(f"--gguf-file {gguf_file}: '{model}' already names a file (:{hub.tag})")
    return str(HubName(hub.repo_id, hub.revision, gguf_file))


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps models, by its own rules, read now (not at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_options() -> dict:
    return dict(cache_dir=hub_cache_dir(), endpoint=os.environ.get("HF_ENDPOINT") or None,
                token=os.environ.get("HF_TOKEN") or None)


def _progress(show: bool):
    """huggingface_hub's bars on a terminal; none otherwise (a server's log, a pipe, the tests)."""
    if show:
        return None
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


# -- choosing files ----------------------------------------------------------------------------------


def pick_gguf(files: list[str], tag: str | None, name: HubName) -> str:
    """The GGUF file of a repo that `tag` names: an exact file name, or the file whose name carries the
    quantization (case-insensitive, as llama.cpp matches it); without a tag Q4_K_M, else the first."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
    if not ggufs:
        raise ModelLoadError(f"'{name.repo_id}' has no .gguf file" + (f" (for :{tag})" if tag else ""))
    if tag and tag.lower().endswith(".gguf"):
        if tag in files:
            return tag
        raise ModelLoadError(f"'{name.repo_id}' has no file '{tag}'; its GGUF files: {', '.join(ggufs)}")
    wanted = (tag or DEFAULT_GGUF_TAG).lower()
    pattern = re.compile(rf"(^|[^a-z0-9]){re.escape(wanted)}([^a-z0-9]|$)")
    matching = [f for f in ggufs if pattern.search(Path(f).name.lower())]
    if not matching and tag is None:
        matching = ggufs
    if not matching:
        tags = ", ".join(Path(f).name for f in ggufs)
        raise ModelLoadError(f"'{name.repo_id}' has no GGUF file for :{tag}; its GGUF files: {tags}")
    single = [f for f in matching if not re.search(r"-\d{5}-of-\d{5}\.gguf$", f.lower())]
    if not single:
        raise ModelLoadError(f"'{name}' is split into several GGUF files ({matching[0]}, ...), which levante "
                             "does not load: merge them with llama.cpp's gguf-split --merge")
    return single[0]


def is_gguf_repo(files: list[str], tag: str | None) -> bool:
    """A tag always means a GGUF file; without one, a repo with GGUF files and no safetensors (some
    GGUF repos carry a config.json too)."""
    return tag is not None or (any(f.lower().endswith(".gguf") for f in files)
                               and not any(f.endswith(".safetensors") for f in files))


def weight_files(files: list[str], index: dict | None) -> list[str]:
    """The safetensors a model needs: those its index names, else the top-level ones."""
    if index is not None:
        return sorted(set(index.get("weight_map", {}).values()))
    return sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)


def sentence_transformers_files(files: list[str], modules: list[dict]) -> list[str]:
    """The config and weights of each stage that modules.json lists in its own folder."""
    folders = [m.get("path", "") for m in modules if m.get("path")]
    return [f for f in files if any(f.startswith(folder.rstrip("/") + "/") for folder in folders)
            and f.endswith((".json", ".safetensors", ".txt"))]


# -- resolving --------------------------------------------------------------------------------------


# What this process resolved already: loading looks a model up more than once (is it an embedding
# model? then open it), and a second look should not ask the Hub again.
_resolved: dict[tuple, Path] = {}


def resolve(name: HubName, progress: bool = False) -> Path:
    """The local path of a Hub model (a snapshot folder, or a .gguf file in it), downloading what is missing."""
    key = (str(name), str(hub_cache_dir()), offline())
    if key in _resolved and _resolved[key].exists():
        return _resolved[key]
    try:
        _resolved[key] = _cached(name) if offline() else _download(name, progress)
        return _resolved[key]
    except ModelLoadError:
        raise
    except Exception as e:  # huggingface_hub's errors become one line that says what to do
        raise ModelLoadError(_explain(name, e)) from None


def _download(name: HubName, progress: bool) -> Path:
    from huggingface_hub import HfApi

    check_hub_responses()
    options = _hub_options()
    info = HfApi(endpoint=options["endpoint"], token=options["token"]).model_info(
        name.repo_id, revision=name.revision)
    snapshot = _snapshot_folder(name, info.sha)
    files = [s.rfilename for s in info.siblings or []]
    fetch = functools.partial(_fetch, name, info.sha, snapshot, progress, options)
    if is_gguf_repo(files, name.tag):
        return fetch(pick_gguf(files, name.tag, name), name.revision)
    if "config.json" not in files:
        raise ModelLoadError(f"'{name}' on the Hub has neither config.json nor a .gguf file: not a model levante "
                             "loads")
    if INDEX not in files and not weight_files(files, None):
        raise _no_weights(name, files)
    _check_config(fetch("config.json", name.revision), name)  # before any weight is downloaded
    index = _json(fetch(INDEX)) if INDEX in files else None
    modules = _json(fetch("modules.json")) if "modules.json" in files else None
    weights = weight_files(files, index if isinstance(index, dict) else None)
    if not weights:
        raise _no_weights(name, files)
    wanted = [f for f in SIDE_FILES if f in files and f not in ("config.json", INDEX, "modules.json")]
    wanted += weights + (sentence_transformers_files(files, modules) if isinstance(modules, list) else [])
    with ThreadPoolExecutor(DOWNLOAD_WORKERS, thread_name_prefix="levante-hub") as pool:
        list(pool.map(fetch, dict.fromkeys(wanted)))
    return snapshot


def _no_weights(name: HubName, files: list[str]) -> ModelLoadError:
    pickled = any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    return ModelLoadError(f"'{name}' has no safetensors weights" + (" (only pickled .bin/.pt files, which levante "
                                                                     "does not load)" if pickled else ""))


def _snapshot_folder(name: HubName, commit) -> Path:
    """Where the files of `commit` go in the cache; a commit that is not 40 hex digits is refused."""
    if not isinstance(commit, str) or not COMMIT.match(commit):
        raise ModelLoadError(f"the Hub ({_endpoint()}) gave '{name}' the commit {_shown(commit)}, not 40 hex digits: "
                             "refused, nothing was written")
    return hub_cache_dir() / f"models--{name.repo_id.replace('/', '--')}" / "snapshots" / commit


def _fetch(name: HubName, commit: str, snapshot: Path, progress: bool, options: dict, filename: str,
           revision: str | None = "") -> Path:
    """One file of the model into the cache, at `commit` (`revision`, when given, names it instead: the
    first file records the branch or tag in refs/); its path, which must lie in `snapshot`."""
    from huggingface_hub import hf_hub_download

    if not _plain_path(filename):
        raise ModelLoadError(f"the Hub ({_endpoint()}) lists a file '{_shown(filename)}' for '{name}', not a plain "
                             "relative path: refused")
    path = Path(hf_hub_download(repo_id=name.repo_id, filename=filename, tqdm_class=_progress(progress),
                                revision=commit if revision == "" else revision, **options))
    if Path(os.path.abspath(path)).parent != Path(os.path.abspath(snapshot / filename)).parent:
        raise ModelLoadError(f"the Hub ({_endpoint()}) sent '{filename}' of '{name}' for another commit than "
                             f"{commit} ({path}): refused")
    return path


def _plain_path(filename) -> bool:
    parts = PurePosixPath(filename).parts if isinstance(filename, str) else ()
    return bool(parts) and not filename.startswith("/") and "\\" not in filename and \
        all(part not in (".", "..") and part.isprintable() for part in parts) and len(filename) < 1024


def _check_config(path: Path, name: HubName) -> None:
    """The sizes config.json declares, bounded (loader/bounds.py) before the weights are downloaded."""
    from levante.config import ModelConfig
    from levante.loader import bounds
    from levante.loader.hf import read_config

    bounds.check_model(ModelConfig.text_fields(read_config(path.parent)), None, f"'{name}' config.json")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "huggingface.co"


def _shown(value, limit: int = 80) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return repr(text if len(text) <= limit else text[:limit] + "...")


@functools.cache
def check_hub_responses() -> None:
    """Have huggingface_hub's HTTP client check every response (`check_hub_response`), once per process:
    its client factory is huggingface_hub's default one plus this hook."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def checked_client():
        client = default_client_factory()
        client.event_hooks["response"] = [*client.event_hooks["response"], check_hub_response]
        return client

    set_client_factory(checked_client)


def check_hub_response(response) -> None:
    """huggingface_hub names the cache's snapshot folder after a response's X-Repo-Commit and a blob after
    the X-Linked-Etag or ETag of a file's HEAD answer: anything but a 40-hex commit and a plain token
    is refused here, before huggingface_hub reads them."""
    commit = response.headers.get("X-Repo-Commit")
    if commit is not None and not COMMIT.match(commit):
        raise ModelLoadError(f"the Hub ({_endpoint()}) sent X-Repo-Commit {_shown(commit)}, not a 40-hex commit: "
                             "refused, nothing was written")
    if response.request.method != "HEAD":
        return  # file metadata comes from HEAD: other answers' ETags (API pages, a file's bytes) name nothing
    for header in ("X-Linked-Etag", "ETag"):
        value = response.headers.get(header)
        if value is not None and not _ETAG.match(value.removeprefix("W/").strip('"')):
            raise ModelLoadError(f"the Hub ({_endpoint()}) sent {header} {_shown(value)}, not a plain token: "
                                 "refused, nothing was written")


def _cached(name: HubName) -> Path:
    """The model from the cache only (HF_HUB_OFFLINE): its snapshot for the revision, complete."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id=name.repo_id, revision=name.revision, local_files_only=True,
                                    **_hub_options()))
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    not_cached = ModelLoadError(f"'{name}' is not (wholly) in the Hugging Face cache ({hub_cache_dir()}) and "
                                f"HF_HUB_OFFLINE is set: run `levante pull {name}` with network access")
    if is_gguf_repo(files, name.tag):
        try:
            return folder / pick_gguf(files, name.tag, name)
        except ModelLoadError:
            raise not_cached from None
    index = folder / INDEX
    weights = weight_files(files, _json(index) if index.is_file() else None)
    if "config.json" not in files or not weights or any(f not in files for f in weights):
        raise not_cached
    return folder


def _json(path) -> dict | list:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {Path(path).name}: {e}") from None


def _explain(name: HubName, error: Exception) -> str:
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        return (f"'{name.repo_id}' is a gated repo on the Hugging Face Hub: accept its terms on its page, then set "
                "HF_TOKEN to a token of that account")
    if isinstance(error, RevisionNotFoundError):
        return f"'{name.repo_id}' has no revision '{name.revision}' on the Hugging Face Hub"
    if isinstance(error, RepositoryNotFoundError):
        hint = "check HF_TOKEN" if os.environ.get("HF_TOKEN") else "set HF_TOKEN if it is private or gated"
        return (f"model '{name.repo_id}' is not a local path, and the Hugging Face Hub does not have it "
                f"(HTTP {status}; {hint})")
    if isinstance(error, RemoteEntryNotFoundError):
        return f"'{name}': a file it needs is missing on the Hub (HTTP 404): {error.response.url}"
    if status == 401:
        return f"the Hugging Face Hub refused the token for '{name.repo_id}' (HTTP 401): check HF_TOKEN"
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError)) and offline():
        return (f"model '{name}' is not in the Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set: "
                f"run `levante pull {name}` with network access")
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub answered HTTP {status} for '{name}': {str(error).splitlines()[0]}"
    if isinstance(error, LocalEntryNotFoundError):  # the Hub was unreachable and the cache lacks it
        return (f"cannot reach the Hugging Face Hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}) and "
                f"'{name}' is not in the cache ({hub_cache_dir()}): check the network, or pull it where there is one")
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"cannot download '{name}' from the Hugging Face Hub: {reason}"


# -- the cache: `levante models`, `levante rm` --------------------------------------------------------


@dataclass
class CachedModel:
    repo_id: str
    size_bytes: int
    refs: list[str]  # branch and tag names the cache knows
    revisions: list[str]  # commit hashes held


def cached_models() -> list[CachedModel]:
    cache = hub_cache_dir()
    if not cache.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    return sorted((CachedModel(repo.repo_id, repo.size_on_disk, sorted(r for rev in repo.revisions for r in rev.refs),
                               sorted(rev.commit_hash for rev in repo.revisions))
                   for repo in info.repos if repo.repo_type == "model"), key=lambda m: m.repo_id.lower())


def remove(name: HubName) -> int:
    """Delete a Hub model from the cache (with @revision: that revision only); the bytes freed."""
    cache = hub_cache_dir()
    from huggingface_hub import scan_cache_dir

    repos = [r for r in scan_cache_dir(cache).repos if r.repo_type == "model" and r.repo_id == name.repo_id] \
        if cache.is_dir() else []
    if not repos:
        raise ModelLoadError(f"'{name.repo_id}' is not in the Hugging Face cache ({cache})")
    revisions = [rev for rev in repos[0].revisions
                 if name.revision is None or name.revision in rev.refs or rev.commit_hash.startswith(name.revision)]
    if not revisions:
        raise ModelLoadError(f"the cache holds no revision '{name.revision}' of '{name.repo_id}'")
    strategy = scan_cache_dir(cache).delete_revisions(*(rev.commit_hash for rev in revisions))
    strategy.execute()
    _resolved.clear()
    return strategy.expected_freed_size

