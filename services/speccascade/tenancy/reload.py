"""Hot reload of the tenants file: a mounted Secret changes in place (the kubelet swaps a symlink),
so the file's content is polled and re-validated when it changes; a broken file keeps the last good
tenants, and says why."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from .tenants import TenantRegistry, TenantsFile

log = logging.getLogger(__name__)


@dataclass
class ReloadResult:
    changed: bool  # the file's content differs from the last poll
    error: str | None = None  # why the new content was refused (the last good tenants stay)


class TenantsFileWatcher:
    """The current registry of a tenants file; `poll()` reloads it when its content changed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.registry = TenantRegistry(TenantsFile.load(self.path))  # at start a broken file is fatal
        self._fingerprint = self._read_fingerprint()
        self.last_error: str | None = None

    def _read_fingerprint(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def poll(self) -> ReloadResult:
        fingerprint = self._read_fingerprint()
        if fingerprint == self._fingerprint:
            return ReloadResult(changed=False)
        self._fingerprint = fingerprint
        try:
            tenants = TenantsFile.load(self.path)
        except ValueError as error:
            self.last_error = str(error)
            log.error("keeping the last good tenants (%d): %s", len(self.registry.tenants), error)
            return ReloadResult(changed=True, error=str(error))
        self.registry = TenantRegistry(tenants)
        self.last_error = None
        log.warning("reloaded %d tenants from %s", len(tenants.tenants), self.path)
        return ReloadResult(changed=True)
