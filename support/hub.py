"""The Hugging Face hub, asked once: which weights load from it, and what a user is told when they cannot.

    reachable(url)            one request, at most PROBE_TIMEOUT_S: does anything answer?
    hub_online()              False under HF_HUB_OFFLINE=1 or when the hub does not answer
    create_timm_model(...)    a frozen timm model from the hub as its model card loads it (offline: the local
                              cache alone, at once), or the same architecture with seeded random weights
    hub_failure(err)          a failed download told apart: no network, or no access to a gated model
    hub_weights(path)         --ckpt / --init-from hf-hub:ORG/REPO[@REVISION] -> the snapshot's local folder
    push_export(...)          an export and its model card -> a hub repository (or, as a dry run, a folder)

Offline (HF_HUB_OFFLINE=1, or no answer within PROBE_TIMEOUT_S) models come from the local cache alone, at once,
instead of after huggingface_hub's retries with backoff (about 23 s per model), or fail in one line that says
how to fetch them on a machine with access.
"""
import os
import re
import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request
from functools import cache

import timm
import torch
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub import constants as hf_constants

from support.cli import InputError, OutputConflict, Unavailable

PROBE_TIMEOUT_S = 3  # the one reachability check of a model hub (reachable)
# How a tool runs without hub weights, in the one line that says they cannot load; a tool without the flag
# (sample.py: --features) says its own (Unavailable.then).
WITHOUT_WEIGHTS = "or test the pipeline without them, with seeded random weights: --random-weights"
HUB_PREFIX = "hf-hub:"  # timm's spelling of a hub model; --ckpt and --init-from take it too
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # ORG/REPO


def hub_failure(err):
    """A failed hub download, told apart: no network, or no access to a gated model."""
    text = f"{type(err).__name__}: {err}"
    if any(s in text for s in ("401", "403", "GatedRepo", "gated", "Unauthorized", "Forbidden")):
        return f"no access: {text[:200]}"
    if any(s in text for s in ("Connection", "Timeout", "resolve", "offline", "OfflineMode", "LocalEntryNotFound",
                               "Network", "unreachable")):
        return f"network unreachable (offline?): {text[:200]}"
    return text[:200]


@cache
def reachable(url):
    """One request to url's host, no retry, at most PROBE_TIMEOUT_S -> False when nothing answers (no route, no
    name resolution, a firewall that drops packets). Any answer counts, an HTTP or TLS error included: then
    the download itself says what is wrong. Asked once per URL and process."""
    parts = urllib.parse.urlsplit(url)
    try:
        request = urllib.request.Request(f"{parts.scheme}://{parts.netloc}/", method="HEAD")
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError) as err:
        return isinstance(getattr(err, "reason", err), ssl.SSLError)
    return True


def hub_online():
    """False under HF_HUB_OFFLINE=1 or when the hub does not answer: then models load from the local cache
    only, at once, instead of after huggingface_hub's five retries with backoff (about 23 s per model)."""
    offline = hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return not offline and reachable(hf_constants.ENDPOINT)


def fetch_failure(err, online):
    """hub_failure, where offline says so: not in the local cache."""
    why = hub_failure(err)
    if not online and why.startswith("network unreachable"):
        return f"offline (HF_HUB_OFFLINE=1, or the hub does not answer), not in the cache {hf_constants.HF_HUB_CACHE}"
    return why


def hub_repo(hub):
    """The hub repository of a timm name ("hf-hub:org/name", or timm's own tag, stored as timm/<name>)."""
    if hub.startswith(HUB_PREFIX):
        return hub[len(HUB_PREFIX):]
    try:
        return timm.models.get_pretrained_cfg(hub).hf_hub_id or hub
    except (AttributeError, RuntimeError, ValueError):
        return hub


def create_timm_model(name, hub, arch, kwargs, pretrained, seed, access, hub_kwargs=None):
    """A frozen timm model in eval mode: from the hub exactly as its model card loads it, or the same
    architecture with random weights drawn from `seed` (without moving the caller's random stream).
    One attempt: offline (HF_HUB_OFFLINE=1, or the hub unreachable) the local hub cache alone is read,
    and a model that is not in it fails at once, in one line that says how to fetch it."""
    if pretrained:
        online, before = hub_online(), hf_constants.HF_HUB_OFFLINE
        try:
            hf_constants.HF_HUB_OFFLINE = before or not online  # read at each request by huggingface_hub
            model = timm.create_model(hub, pretrained=True, **(kwargs if hub_kwargs is None else hub_kwargs))
        except Exception as err:  # gated repo, no token, no network: say which, and what to do
            raise Unavailable(f"{name}: could not load {hub} ({fetch_failure(err, online)}); {access}; to use it "
                              f"offline, run `hf download "
                              f"{hub_repo(hub)}` on a machine with access and copy its HF_HOME "
                              f"({hf_constants.HF_HOME}) here", WITHOUT_WEIGHTS) from err
        finally:
            hf_constants.HF_HUB_OFFLINE = before
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(arch, pretrained=False, **kwargs)
    return model.eval().requires_grad_(False)


# -------- exports on the hub: fetched by name, published with a model card --------------------------------------
def hub_weights(path):
    """hf-hub:ORG/REPO[@REVISION] (an export on the hub) -> the local folder of that snapshot, through
    huggingface_hub's cache: offline (HF_HUB_OFFLINE=1, or the hub does not answer) the cache alone, at once, and
    what it lacks fails in one line. Any other path is returned as it is."""
    if not str(path).startswith(HUB_PREFIX):
        return path
    repo, _, revision = str(path)[len(HUB_PREFIX):].partition("@")
    if not REPO_ID.fullmatch(repo):
        raise InputError(f"{path}: name a hub export as hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    online = hub_online()
    try:
        return snapshot_download(repo, revision=revision or None, local_files_only=not online)
    except Exception as err:  # no such repo or revision, gated, no network
        raise Unavailable(f"{path}: could not fetch {repo}{'@' + revision if revision else ''} "
                          f"({fetch_failure(err, online)}); to use it offline, run `hf download {repo}` on a machine "
                          f"with access and copy its HF_HOME ({hf_constants.HF_HOME}) here") from err


def push_export(folder, repo, written, dry_run=None, private=False):
    """An export folder, with `written` ({name: text}: its model card README.md, ...) added or put in place of the
    folder's files of that name -> one commit to the hub repository ORG/REPO, created if new; dry_run=DIR: the
    same files written to DIR (new or empty) and nothing uploaded -> where they went."""
    if not REPO_ID.fullmatch(repo):
        raise InputError(f"push {repo}: name the hub repository as ORG/REPO")
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)
    files = [name for name in files if name not in written]
    if dry_run is not None:
        if os.path.exists(dry_run) and (not os.path.isdir(dry_run) or os.listdir(dry_run)):
            raise OutputConflict(f"--dry-run {dry_run} already exists and is not an empty folder: choose another")
        for name in files + list(written):
            os.makedirs(os.path.dirname(os.path.join(dry_run, name)), exist_ok=True)
            if name in written:
                with open(os.path.join(dry_run, name), "w") as f:
                    f.write(written[name])
            else:
                shutil.copyfile(os.path.join(folder, name), os.path.join(dry_run, name))
        return dry_run
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=written[name].encode() if name in written
                                     else os.path.join(folder, name)) for name in files + list(written)]
    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        api.create_commit(repo, operations, commit_message=f"CytoSyn export from {os.path.basename(folder)}")
    except Exception as err:  # no token, no write access, no network
        raise Unavailable(f"push {repo}: {hub_failure(err)}; log in with `hf auth login` (a token with write "
                          f"access), or pass --dry-run DIR to see what would be uploaded") from err
    return f"{hf_constants.ENDPOINT}/{repo}"
