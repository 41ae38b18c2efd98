"""The tenants file reloads when it changes; a broken one keeps the last good tenants."""

from __future__ import annotations

import yaml
from speccascade.tenancy import TenantsFileWatcher, key_digest, new_api_key


def write(path, tenants):
    path.write_text(yaml.safe_dump({"tenants": tenants}))


def test_a_changed_file_is_applied_and_a_broken_one_is_refused(tmp_path):
    path = tmp_path / "tenants.yaml"
    key, added = new_api_key(), new_api_key()
    write(path, [{"id": "a", "key_sha256": [key_digest(key)]}])
    watcher = TenantsFileWatcher(path)
    assert watcher.poll().changed is False
    write(path, [{"id": "a", "key_sha256": [key_digest(key)]}, {"id": "b", "key_sha256": [key_digest(added)]}])
    assert watcher.poll().changed and watcher.registry.authenticate(added).id == "b"
    path.write_text("tenants: [{id: c, key_sha256: [not-a-digest]}]")
    result = watcher.poll()
    assert result.changed and "never the key itself" in result.error
    assert watcher.registry.authenticate(added).id == "b"  # the last good tenants stay
    assert watcher.last_error == result.error
