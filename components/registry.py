"""register-model: immutable model versions in the object store, optionally mirrored to Kubeflow Model Registry.

Layout under the store's prefix:
    models/<name>/<version>/.claim             written first, create-only: whoever creates it owns the version
    models/<name>/<version>/model.pt           the fine-tuned state dict
    models/<name>/<version>/<extra files>      e.g. training_data.json: the images it trained and validated on
    models/<name>/<version>/model_card.json    written after model.pt: a version is complete once its card exists
    models/<name>/latest                       {"version": ..., "model_uri": ..., "card_uri": ...}, moved last

Versions are never overwritten: a version that has any object under its folder, complete or not, is taken.
Allocation is atomic: a registration owns a version only once it created that version's `.claim` with a
conditional write (`If-None-Match: *`), so two registrations at once get v1 and v2, never both v1.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from components.errors import UserError, first_line
from components.hashing import sha256_file
from components.storage import ObjectStore

MODEL_FILE = "model.pt"
CARD_FILE = "model_card.json"
LATEST = "latest"
CLAIM_FILE = ".claim"
CARD_FORMAT = 1
_MAX_CLAIM_TRIES = 50

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_AUTO_VERSION = re.compile(r"^v(\d+)$")


class RegistryError(UserError, RuntimeError):
    """A one-line, user-facing registry failure."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str
    card_uri: str
    card: dict


def check_name(kind: str, value: str) -> str:
    if not _NAME.match(value or "") or value == LATEST:
        raise RegistryError(f"invalid model {kind} {value!r}: use letters, digits, '.', '_', '-' "
                            f"(not {LATEST!r}), at most 128 characters")
    return value


class ObjectStoreRegistry:
    def __init__(self, store: ObjectStore):
        self.store = store

    def _key(self, name: str, *parts: str) -> str:
        return self.store.key("models", name, *parts)

    def _taken(self, name: str) -> set[str]:
        """Every version folder that has at least one object, complete or not."""
        root = self._key(name) + "/"
        return {k[len(root):].split("/", 1)[0] for k in self.store.list(root) if "/" in k[len(root):]}

    def versions(self, name: str) -> list[str]:
        """Complete versions (those with a model card), v1 < v2 < v10, then other names sorted."""
        root = self._key(name) + "/"
        done = [k[len(root):-len(CARD_FILE) - 1] for k in self.store.list(root) if k.endswith("/" + CARD_FILE)]
        return sorted(done, key=_version_order)

    def next_version(self, name: str, also_taken: set[str] = frozenset()) -> str:
        taken = self._taken(name) | set(also_taken)
        numbers = [int(m.group(1)) for v in taken if (m := _AUTO_VERSION.match(v))]
        return f"v{max(numbers, default=0) + 1}"

    def _claim(self, name: str, version: str) -> bool:
        """Create the version's claim; True when this call owns the version."""
        key = self._key(name, version, CLAIM_FILE)
        token = uuid.uuid4().hex
        if not self.store.put_bytes_if_absent(key, json.dumps({"token": token}).encode()):
            return False
        # Read back: a store that checks the condition and then writes (not atomically) can let two
        # creators through; only the one whose token survived owns the version.
        return self.store.get_json(key).get("token") == token

    def _allocate(self, name: str, version: str | None) -> str:
        if version:
            check_name("version", version)
            if version in self._taken(name) or not self._claim(name, version):
                raise RegistryError(f"model {name!r} version {version!r} already exists at "
                                    f"{self.store.uri(self._key(name, version))}/; versions are immutable")
            return version
        lost: set[str] = set()
        for _ in range(_MAX_CLAIM_TRIES):
            version = self.next_version(name, lost)
            if self._claim(name, version):
                return version
            lost.add(version)  # another registration got there first: take the next number
        raise RegistryError(f"model {name!r}: could not claim a new version after {_MAX_CLAIM_TRIES} tries "
                            "(too many registrations at once?)")

    def latest(self, name: str) -> dict | None:
        """The `latest` pointer of a model, or None when the model has no version yet."""
        key = self._key(name, LATEST)
        if not self.store.exists(key):
            return None
        pointer = self.store.get_json(key)
        if not isinstance(pointer, dict) or "version" not in pointer:
            raise RegistryError(f"{self.store.uri(key)} is not a registry pointer (no 'version')")
        return pointer

    def card(self, name: str, version: str) -> dict:
        return self.store.get_json(self._key(name, version, CARD_FILE))

    def extra(self, name: str, version: str, filename: str) -> dict | None:
        """One of the JSON files registered with a version, or None when it has none of that name."""
        key = self._key(name, version, filename)
        return self.store.get_json(key) if self.store.exists(key) else None

    def fetch(self, name: str, version: str, dest: str | Path) -> Path:
        """Download a complete version's model.pt (checked against its sha256) to dest."""
        if version == LATEST:
            pointer = self.latest(name)
            if pointer is None:
                raise RegistryError(f"model {name!r} has no registered version")
            version = pointer["version"]
        card = self.card(name, version)
        dest = Path(dest)
        self.store.get_file(self._key(name, version, MODEL_FILE), dest)
        actual = sha256_file(dest)
        if actual != card["model"]["sha256"]:
            dest.unlink(missing_ok=True)
            raise RegistryError(f"{name} {version}: model.pt sha256 {actual} does not match its card "
                                f"({card['model']['sha256']})")
        return dest

    def register(self, name: str, model_path: str | Path, card: dict, version: str | None = None, *,
                 extra: dict[str, dict] | None = None) -> RegisteredVersion:
        """Store model.pt and the `extra` JSON files, then the card, then move `latest`; refuses to touch an
        existing version."""
        check_name("name", name)
        model_path = Path(model_path)
        if not model_path.is_file():
            raise RegistryError(f"{model_path}: no such model file to register")
        version = self._allocate(name, version)
        sha = sha256_file(model_path)
        model_key = self._key(name, version, MODEL_FILE)
        card_key = self._key(name, version, CARD_FILE)
        full_card = {
            **card,
            "format_version": CARD_FORMAT,
            "name": name,
            "version": version,
            "created": card.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {**card.get("model", {}), "uri": self.store.uri(model_key), "sha256": sha,
                      "bytes": model_path.stat().st_size, "file": MODEL_FILE},
        }
        self.store.put_file(model_key, model_path, sha)
        for filename, doc in (extra or {}).items():
            check_name("file name", filename)
            self.store.put_json(self._key(name, version, filename), doc)
        self.store.put_json(card_key, full_card)
        if self._may_move_latest(name, version):
            self.store.put_json(self._key(name, LATEST), {
                "version": version, "model_uri": self.store.uri(model_key), "card_uri": self.store.uri(card_key),
                "sha256": sha, "created": full_card["created"]})
        return RegisteredVersion(name, version, self.store.uri(model_key), self.store.uri(card_key), full_card)

    def _may_move_latest(self, name: str, version: str) -> bool:
        """`latest` never moves back from vN to an older vM (registrations finishing out of order)."""
        current = self.latest(name)
        mine, theirs = _AUTO_VERSION.match(version), _AUTO_VERSION.match(str((current or {}).get("version", "")))
        return not (mine and theirs and int(theirs.group(1)) > int(mine.group(1)))


def _version_order(version: str):
    m = _AUTO_VERSION.match(version)
    return (0, int(m.group(1)), "") if m else (1, 0, version)


# -- Kubeflow Model Registry ------------------------------------------------------------------------

def _flat_metadata(card: dict) -> dict[str, str | int | float | bool]:
    """Model Registry custom properties hold scalars only: flatten the card's numbers and ids."""
    out: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}" if not prefix else f"{prefix}.{k}", v)
        elif isinstance(value, (bool, int, float, str)) and value is not None:
            out[prefix] = value

    for section in ("metrics", "zero_shot", "champion"):
        walk(section, card.get(section) or {})
    for key in ("run_id", "created", "version"):
        if card.get(key):
            out[key] = card[key]
    out["model.sha256"] = card["model"]["sha256"]
    out["card_uri"] = card.get("card_uri", "")
    if card.get("dataset", {}).get("content_hash"):
        out["dataset.content_hash"] = card["dataset"]["content_hash"]
    if card.get("weights", {}).get("sha256"):
        out["weights.sha256"] = card["weights"]["sha256"]
    return out


def _client_version() -> str:
    from importlib.metadata import version

    return version("model-registry")


def register_in_model_registry(url: str, registered: RegisteredVersion, *, author: str = "sam-pipeline",
                               format_version: str = "2") -> dict:
    """Record a registered version in Kubeflow Model Registry (metadata only; the bytes stay in S3)."""
    import logging
    import warnings

    from model_registry import ModelRegistry

    try:
        with warnings.catch_warnings():
            # Inside a cluster the service-account token is read when present; outside there is none.
            warnings.filterwarnings("ignore", message="User access token is missing")
            client = ModelRegistry(url, author=author, log_level=logging.ERROR)
        card = {**registered.card, "card_uri": registered.card_uri}
        client.register_model(
            registered.name, registered.model_uri,
            model_format_name="pytorch", model_format_version=format_version,
            version=registered.version,
            version_description=f"SAM {card.get('model', {}).get('model_type', '')} fine-tuned by sam-pipeline",
            metadata=_flat_metadata(card),
        )
        mv = client.get_model_version(registered.name, registered.version)
    except Exception as e:  # the client raises many types (StoreError, aiohttp, openapi); one line for all
        detail = f"{type(e).__name__}: {first_line(e) if str(e).strip() else 'failed'}"
        if type(e).__name__ == "NotFoundException":
            # The client's first call (a registered-model listing under /api/model_registry/v1/) found
            # no such path: a server of another API line, e.g. v0.3.5, which serves only /v1alpha3/.
            detail += (f" (the server does not serve the REST API of client model-registry "
                       f"{_client_version()}; deploy the paired server: docs/kubernetes.md, Model Registry)")
        raise RegistryError(f"Kubeflow Model Registry at {url}: {detail}") from None
    return {"model_registry_url": url, "model_registry_version_id": getattr(mv, "id", None)}
