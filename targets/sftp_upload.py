"""A resumable, verified upload over an SSH transport's file connection (SFTP).

The file goes to a temporary name derived from its sha256 in ``<root>/incoming/``; a dropped
connection is retried (the transport's ``retries``, with backoff) from where the partial file ends,
after checking that the partial file hashes like the start of the local one; the device hashes the
whole file before it is renamed into place. When every attempt fails, the partial file stays for a
later upload to resume.
"""
from __future__ import annotations

import logging
import os
import posixpath
import shlex
import time
from pathlib import Path

import paramiko

from edgebuild.core.errors import DeviceError
from edgebuild.core.files import sha256_file
from edgebuild.targets.client import ConnectionLost
from edgebuild.targets.ssh import NETWORK_ERRORS

CHUNK_BYTES = 1 << 20     # bytes read from the local file per SFTP write
REMOTE_SHA256 = ("import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb') as f:\n"
                 "    for b in iter(lambda: f.read(1 << 20), b''):\n        h.update(b)\n"
                 "print(h.hexdigest())")

log = logging.getLogger(__name__)


class SftpUpload:
    """Upload ``local_path`` as ``remote_name`` through ``transport`` (an ``SSHTransport``)."""

    def __init__(self, transport, local_path, remote_name: str):
        self.t, self.local_path, self.remote_name = transport, local_path, remote_name

    def run(self) -> str:
        """SFTP ``local_path`` to ``<root>/incoming/<remote_name>``: resumable, then sha256-checked
        on the device, then renamed into place.

        A dropped connection is retried (``retries`` times, with backoff) from where the partial
        file ends. When every attempt fails, the partial file stays for a later upload to resume.
        """
        local_path, remote_name = self.local_path, self.remote_name
        if not remote_name or "/" in remote_name or remote_name.startswith("."):
            raise DeviceError(f"upload name {remote_name!r} must be a plain file name")
        size, sha = os.path.getsize(local_path), sha256_file(local_path)
        incoming = posixpath.join(self.t.device_root(), "incoming")
        final = posixpath.join(incoming, remote_name)
        tmp = posixpath.join(incoming, f".{remote_name}.part-{sha[:16]}")
        self._transfer(local_path, incoming, tmp, size)
        problem = self._verify(sha, tmp)
        if problem is not None:
            self._remove_quietly(tmp)
            raise DeviceError(f"upload of {local_path} to {self.t.where}:{final} failed: {problem}")
        try:
            self._rename(tmp, final)
        except NETWORK_ERRORS as err:
            raise ConnectionLost(f"cannot rename {tmp} to {final} on {self.t.where}: {err}") from None
        return final

    def _transfer(self, local_path, incoming: str, tmp: str, size: int) -> None:
        """Send the file to ``tmp``, reconnecting and resuming after network errors."""
        for attempt in range(1, self.t.retries + 2):
            try:
                sftp = self.t._file_session()
                self._makedirs(sftp, incoming)
                if attempt == 1:
                    self._remove_stale_partials(sftp, incoming, tmp)
                self._send(sftp, local_path, tmp, size)
                return
            except NETWORK_ERRORS as err:
                self.t._drop_files()
                why = str(err) or type(err).__name__
                if attempt > self.t.retries:
                    raise ConnectionLost(
                        f"upload of {local_path} to {self.t.where} failed after {attempt} attempt(s): "
                        f"{why}; the partial file {tmp} is kept and the next upload resumes from it") from None
                delay = self.t.policy.delay(attempt - 1)
                log.warning("upload to %s broke off (%s); resuming in %.1f s", self.t.where, why, delay)
                time.sleep(delay)

    def _send(self, sftp, local_path, tmp: str, size: int) -> None:
        """Append to ``tmp`` what it lacks of the local file (all of it when nothing is usable)."""
        offset = self._resume_offset(sftp, local_path, tmp, size)
        with open(local_path, "rb") as src, self.t._open_remote(sftp, tmp, "r+b" if offset else "wb") as dst:
            src.seek(offset)
            dst.seek(offset)
            dst.set_pipelined(True)
            done = offset
            for block in iter(lambda: src.read(CHUNK_BYTES), b""):
                dst.write(block)
                done += len(block)
                if self.t.progress is not None:
                    self.t.progress(done, size)
        have = sftp.stat(tmp).st_size
        if have != size:
            raise OSError(f"{tmp} holds {have} bytes after the transfer, expected {size}")

    def _remove_stale_partials(self, sftp, incoming: str, tmp: str) -> None:
        """Delete partial uploads of the same name but other contents (a file changed since)."""
        prefix = posixpath.basename(tmp).rsplit("-", 1)[0] + "-"
        for name in sftp.listdir(incoming):
            if name.startswith(prefix) and name != posixpath.basename(tmp):
                log.info("removing the stale partial upload %s", name)
                sftp.remove(posixpath.join(incoming, name))

    def _resume_offset(self, sftp, local_path, tmp: str, size: int) -> int:
        """Bytes of a partial upload that can stay: its length when it hashes like the start of
        the local file, else 0."""
        try:
            have = sftp.stat(tmp).st_size
        except FileNotFoundError:
            return 0
        if not have or have > size:
            return 0
        remote = self._remote_sha256(tmp)
        if remote is not None and remote == sha256_file(local_path, have):
            log.info("resuming the upload of %s at byte %d of %d", Path(local_path).name, have, size)
            return have
        log.warning("partial upload %s does not match %s; sending it again from the start",
                    tmp, local_path)
        return 0

    def _remote_sha256(self, path: str) -> str | None:
        """sha256 of a device file by ``sha256sum``, else by the device's Python; None if neither runs."""
        pythons = dict.fromkeys([("python3",), tuple(shlex.split(self.t.agent_python))])
        for argv in [["sha256sum", "--", path]] + [[*py, "-c", REMOTE_SHA256, path] for py in pythons]:
            status, output = self.t.run(argv, timeout_s=max(self.t.io_timeout_s, 600.0))
            words = output.split()
            if status == 0 and words and len(words[0]) == 64:
                return words[0].lower()
        return None

    def _verify(self, expected: str, remote_path: str) -> str | None:
        """None when the device's sha256 of ``remote_path`` is ``expected``, else why not."""
        actual = self._remote_sha256(remote_path)
        if actual is None:
            return "cannot hash it on the device (neither sha256sum nor python3 runs there)"
        return None if actual == expected else f"sha256 on the device is {actual}, expected {expected}"

    def _makedirs(self, sftp, path: str) -> None:
        missing = []
        while path not in ("", "/"):
            try:
                sftp.stat(path)
                break
            except FileNotFoundError:
                missing.append(path)
                path = posixpath.dirname(path)
        for folder in reversed(missing):
            sftp.mkdir(folder)

    def _rename(self, tmp: str, final: str) -> None:
        sftp = self.t._file_session()
        try:
            sftp.posix_rename(tmp, final)
        except (OSError, paramiko.SSHException):    # a server without the posix-rename extension
            self._remove_quietly(final)
            sftp.rename(tmp, final)

    def _remove_quietly(self, path: str) -> None:
        try:
            self.t._file_session().remove(path)
        except (DeviceError, *NETWORK_ERRORS):
            pass
