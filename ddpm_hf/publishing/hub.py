"""Publishing a run on the Hugging Face Hub.

1. `check_hub_access` runs when training starts: a token exists, the Hub accepts it with write access,
   and the repo exists or is created. A missing or bad token fails in seconds, not after the run.
2. What goes up is an allow-list (`run_folder.PUBLISHED`): the pipeline, the card, images, metrics and the
   config. Checkpoints, optimizer state and tracker logs are never listed, so never uploaded.
3. `HubPusher.push` first takes a snapshot of those files (hard links: every file in an output folder
   is replaced by an atomic rename, so a link keeps the complete old content while training writes the
   new one), then uploads the snapshot, in a background thread during training.

The token comes from the caller, `HF_TOKEN` or the huggingface_hub login; it is passed to
huggingface_hub and never printed, logged or written.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

from ddpm_hf.errors import StateError
from ddpm_hf.outputs.files import refuse_links, tmp_sibling
from ddpm_hf.outputs.run_folder import DISTILL_RECORD, MODEL_INDEX, PUBLISHED, PUBLISHED_SNAPSHOTS, TRAINING_CONFIG

logger = logging.getLogger(__name__)

class HubError(StateError):
    """A one-line reason why the Hub cannot be used, and what to do about it."""


def files_to_upload(folder, snapshots: bool = False) -> List[str]:
    """The paths (relative, '/'-separated, sorted) under `folder` that match `run_folder.PUBLISHED` (and, with
    `snapshots`, post-hoc EMA's snapshots: PUBLISHED_SNAPSHOTS)."""
    folder = Path(folder)
    allowed = PUBLISHED + (PUBLISHED_SNAPSHOTS if snapshots else ())
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            if any(fnmatch.fnmatchcase(rel, pattern) for pattern in allowed):
                found.append(rel)
    return sorted(found)


def _retry_hint(output_dir: Optional[str], repo_id: str) -> str:
    return f"push later with `ddpm-push {output_dir or 'OUTPUT_DIR'} --hub_model_id {repo_id}`"


def _status(error) -> str:
    return str(error.response.status_code) if error.response is not None else "?"


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def check_hub_access(api, repo_id: str, token: Optional[str] = None, private: bool = False,
                     output_dir: Optional[str] = None) -> str:
    """Check the token and the repo (creating it if needed) through `api` (an `HfApi`); return the full
    `namespace/name` repo id. Raises HubError with the reason and the fix."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as e:  # HFValidationError
        raise HubError(f"--hub_model_id {repo_id!r} is not a valid repo id ({e}); use 'name' or 'namespace/name'.") from None
    token = token or get_token()
    if not token:
        raise HubError("Pushing to the Hub needs a token with write access: pass --hub_token, set HF_TOKEN, "
                       "or run `hf auth login` (or drop --push_to_hub).")
    try:
        who = api.whoami(token=token)
    except OfflineModeIsEnabled:
        raise HubError(f"HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset it, or {_retry_hint(output_dir, repo_id)}.") from None
    except HfHubHTTPError as e:
        raise HubError(f"The Hub at {api.endpoint} rejected the token (HTTP {_status(e)}); make a write token at "
                       f"{api.endpoint}/settings/tokens and pass it with --hub_token or HF_TOKEN.") from None
    except Exception as e:  # connection refused, DNS, timeout: the Hub cannot be reached
        raise HubError(f"Cannot reach the Hub at {api.endpoint} ({type(e).__name__}); check the network, or "
                       f"{_retry_hint(output_dir, repo_id)}.") from None
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(f"The token of {who.get('name')} is read-only; make a write token at {api.endpoint}/settings/tokens.")
    full_id = repo_id if "/" in repo_id else f"{who['name']}/{repo_id}"
    try:
        api.create_repo(full_id, private=private, exist_ok=True, token=token)
    except HfHubHTTPError as e:
        raise HubError(f"Cannot create or write to the repo {full_id} on {api.endpoint} (HTTP {_status(e)}) as "
                       f"{who.get('name')}; check the namespace and the token's permissions.") from None
    return full_id


def snapshot(folder, snapshots: bool = False) -> Path:
    """A hidden sibling folder inside `folder` holding hard links to (or, across devices, copies of) the
    files to upload, frozen as they are now. Named like our other temporaries, so a crash leaves
    nothing that `remove_stale_temporaries` does not clean."""
    folder = Path(folder)
    staging = tmp_sibling(folder / "hub-push")
    staging.mkdir()
    for rel in files_to_upload(folder, snapshots):
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(folder / rel, dst)
        except OSError:
            shutil.copy2(folder / rel, dst)
    return staging


class HubPusher:
    """Pushes snapshots of an output folder to one repo, one upload at a time, in a background thread.

    Construct it when training starts: it checks the credentials and creates the repo."""

    def __init__(self, repo_id: str, token: Optional[str] = None, private: bool = False, output_dir: Optional[str] = None):
        from huggingface_hub import HfApi

        self._api = HfApi(token=token)
        self.repo_id = check_hub_access(self._api, repo_id, token, private, output_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._pending: Optional[Future] = None

    @property
    def url(self) -> str:
        return f"{self._api.endpoint}/{self.repo_id}"

    def _upload(self, staging: Path, message: str):
        try:
            return self._api.upload_folder(repo_id=self.repo_id, repo_type="model", folder_path=staging,
                                           commit_message=message)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def push_in_background(self, folder, message: str) -> Optional[Future]:
        """Snapshot `folder` now and upload it in the background. If the previous upload is still running,
        this one is skipped (the next, or the final push, carries the newer files): pushes never queue up
        behind a slow network and never stall training. Failures are logged; the next push retries."""
        if self._pending is not None and not self._pending.done():
            logger.warning("Hub push %r skipped: the previous push to %s is still uploading.", message, self.repo_id)
            return None
        self._pending = self._executor.submit(self._upload, snapshot(folder), message)
        self._pending.add_done_callback(self._report)
        return self._pending

    def _report(self, future: Future) -> None:
        error = future.exception()
        if error is not None:
            logger.warning("Background push to %s failed (%s); the next push retries.", self.repo_id, _first_line(error))
        else:
            logger.info("Pushed to %s (commit %s).", self.url, future.result().oid[:12])

    def wait(self) -> None:
        """Wait for the background upload in flight, if any (its failure was already logged)."""
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:
                pass

    def push(self, folder, message: str, snapshots: bool = False):
        """Upload `folder`'s allow-listed files now (after any background upload; `snapshots`: post-hoc EMA's too);
        raise HubError on failure."""
        self.wait()
        try:
            return self._upload(snapshot(folder, snapshots), message)
        except Exception as e:
            raise HubError(f"The push to {self.url} failed ({_first_line(e)}); "
                           f"the files are intact in {folder}; {_retry_hint(str(folder), self.repo_id)}.") from None

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def push_output_folder(output_dir, *, repo_id: Optional[str] = None, token: Optional[str] = None, private: bool = False,
                       commit_message: str = "Upload DDPM pipeline with ddpm_hf", snapshots: bool = False):
    """`ddpm-push` (and `ddpm-distill --push_to_hub` at its end): check access, rewrite the model card for the repo (a
    training run's, or a distilled folder's), upload the allow-list; return (repo URL, commit info)."""
    from ddpm_hf.publishing.model_card import write_distill_card, write_model_card

    output_dir = Path(output_dir)
    refuse_links(output_dir, "ddpm-push")
    if not (output_dir / MODEL_INDEX).is_file():
        raise HubError(f"{output_dir} has no {MODEL_INDEX}: give the output folder of a finished training run "
                       "(or a folder written by save_pretrained).")
    pusher = HubPusher(repo_id or output_dir.resolve().name, token, private, str(output_dir))
    try:
        if (output_dir / DISTILL_RECORD).is_file():  # ddpm-distill's: its last student on top, its rounds not sent
            write_distill_card(output_dir, pusher.repo_id)
        elif (output_dir / TRAINING_CONFIG).is_file():
            write_model_card(output_dir, pusher.repo_id)
        else:
            logger.warning("%s has no %s, so no model card is written; the repo gets what is there.", output_dir,
                           TRAINING_CONFIG)
        return pusher.url, pusher.push(output_dir, commit_message, snapshots)
    finally:
        pusher.close()
