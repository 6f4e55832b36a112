"""Which version directories of a base path should be served.

Version directories are the integer-named children of ``base_path`` that hold
a ``saved_model.pb`` (or ``.pbtxt``); other children are ignored.  The policy
comes from ``ModelConfig.model_version_policy``: ``latest { num_versions }``
(default 1), ``all {}``, or ``specific { versions }``.
"""
import os

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def list_versions(base_path: str) -> dict:
    """{version: directory} for every servable-looking version directory.

    Raises OSError when ``base_path`` itself cannot be listed (missing, renamed
    away, unmounted, a dangling symlink): that is not "no versions", and the
    manager keeps what it has loaded (TF Serving: "Could not find base path").
    """
    names = os.listdir(base_path)
    found = {}
    for name in names:
        if not name.isdigit():
            continue
        path = os.path.join(base_path, name)
        if os.path.isdir(path) and any(
                os.path.exists(os.path.join(path, f)) for f in SAVED_MODEL_FILES):
            found[int(name)] = path
    return found


def aspired_versions(policy, available: dict) -> set:
    """Versions of ``available`` that ``policy`` (a FileSystemStoragePathSourceConfig.ServableVersionPolicy) wants."""
    kind = policy.WhichOneof("policy_choice") if policy is not None else None
    if kind == "all":
        return set(available)
    if kind == "specific":
        return {v for v in policy.specific.versions if v in available}
    num = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
    return set(sorted(available, reverse=True)[:num])
