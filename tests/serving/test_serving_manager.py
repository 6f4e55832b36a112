"""ServableManager on fake servables (no TensorFlow): base-path faults, load
retries, the latest-good-version fallback, retired models, the drain."""
import shutil
import time

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.errors import ServingError
from serving.manager import LoadRetryOptions, ServableManager

State = get_model_status_pb2.ModelVersionStatus.State


class FakeServable:
    def __init__(self, version):
        self.version = version
        self.closed = False
        self.held = 0

    def acquire(self):
        self.held += 1

    def release(self):
        self.held -= 1

    def close(self):
        self.closed = True


class Loader:
    """load_fn whose versions fail ``failures[v]`` times before loading."""

    def __init__(self, failures=None):
        self.failures = dict(failures or {})
        self.attempts = {}

    def __call__(self, name, version, path):
        self.attempts[version] = self.attempts.get(version, 0) + 1
        if self.attempts[version] <= self.failures.get(version, 0):
            raise ServingError(grpc.StatusCode.DATA_LOSS,
                               f"attempt {self.attempts[version]}: variables missing")
        return FakeServable(version)


def add_version(base, version):
    (base / str(version)).mkdir(parents=True, exist_ok=True)
    (base / str(version) / "saved_model.pb").write_bytes(b"x")


def make_manager(base, loader, **kwargs):
    config = model_server_config_pb2.ModelConfigList()
    config.config.add(name="m", base_path=str(base), model_platform="tensorflow")
    manager = ServableManager(loader, poll_seconds=0, **kwargs)
    manager.set_config(config)
    return manager


def states(manager, name="m"):
    return {v: (state, err.message if err else "") for v, state, err in manager.status(name)}


def serving_version(manager, name="m"):
    servable = manager.acquire(name)
    manager.release(servable)
    return servable.version


def test_base_path_deleted_or_renamed_keeps_loaded_versions(tmp_path, caplog):
    base = tmp_path / "m"
    add_version(base, 1)
    manager = make_manager(base, Loader())
    manager.poll_once()
    assert serving_version(manager) == 1

    shutil.rmtree(base)                      # deleted
    for _ in range(3):
        manager.poll_once()
    assert states(manager) == {1: (State.AVAILABLE, "")}
    assert serving_version(manager) == 1
    assert caplog.text.count(f"Could not find base path {base} for servable m") == 1

    add_version(tmp_path / "away", 2)        # renamed in from elsewhere: back, with v2
    (tmp_path / "away").rename(base)
    manager.poll_once()
    assert serving_version(manager) == 2
    assert states(manager)[1] == (State.END, "")   # unloaded normally once v2 served

    base.rename(tmp_path / "gone")           # renamed away
    manager.poll_once()
    assert serving_version(manager) == 2


def test_empty_base_path_unloads_only_when_the_next_poll_agrees(tmp_path):
    """A directory being deleted lists no version for a moment; an empty base
    path unloads its versions (as TF Serving) only when seen twice in a row."""
    base = tmp_path / "m"
    add_version(base, 1)
    manager = make_manager(base, Loader())
    manager.poll_once()
    shutil.rmtree(base / "1")
    manager.poll_once()
    assert serving_version(manager) == 1
    add_version(base, 1)                     # it was a transient state
    manager.poll_once()
    shutil.rmtree(base / "1")
    manager.poll_once()
    assert serving_version(manager) == 1     # the earlier empty poll does not count
    manager.poll_once()
    assert states(manager) == {1: (State.END, "")}
    with pytest.raises(ServingError) as err:
        manager.acquire("m")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_failed_load_is_retried_until_it_succeeds(tmp_path):
    base = tmp_path / "m"
    add_version(base, 1)
    add_version(base, 2)
    loader = Loader({2: 2})                  # v2 fails twice (variables/ still copying)
    manager = make_manager(base, loader, retry=LoadRetryOptions(5, 0.05))
    manager.poll_once()
    assert loader.attempts == {2: 1}
    assert states(manager) == {2: (State.LOADING, "")}   # waiting for its retry
    manager.retry_due()                      # not due yet: nothing happens
    assert loader.attempts == {2: 1}
    time.sleep(0.06)
    manager.retry_due()
    assert loader.attempts == {2: 2}
    time.sleep(0.06)
    manager.poll_once()                      # a poll runs due retries too
    assert loader.attempts == {2: 3}
    assert states(manager) == {2: (State.AVAILABLE, "")}
    assert serving_version(manager) == 2


def test_retries_are_bounded_and_never_replace_a_working_version(tmp_path):
    base = tmp_path / "m"
    add_version(base, 1)
    loader = Loader({2: 99})
    manager = make_manager(base, loader, retry=LoadRetryOptions(2, 0.0))
    manager.poll_once()
    assert serving_version(manager) == 1
    add_version(base, 2)
    manager.poll_once()   # interval 0: both retries run in this pass
    assert loader.attempts[2] == 3
    assert states(manager)[2] == (State.END, "attempt 3: variables missing")
    assert states(manager)[1] == (State.AVAILABLE, "")
    manager.poll_once()
    assert loader.attempts[2] == 3           # not tried again
    assert serving_version(manager) == 1


def test_retry_waits_are_dropped_when_the_version_goes_away(tmp_path):
    base = tmp_path / "m"
    add_version(base, 1)
    loader = Loader({1: 99})
    manager = make_manager(base, loader, retry=LoadRetryOptions(5, 60.0))
    manager.poll_once()
    assert states(manager) == {1: (State.LOADING, "")}
    shutil.rmtree(base / "1")
    add_version(base, 3)
    manager.poll_once()
    assert sorted(states(manager)) == [3]     # v1's retries were cancelled and forgotten
    assert serving_version(manager) == 3


@pytest.mark.parametrize("fallback", [False, True])
def test_corrupt_newest_version_at_startup(tmp_path, fallback):
    base = tmp_path / "m"
    add_version(base, 1)
    add_version(base, 2)
    manager = make_manager(base, Loader({2: 99}), retry=LoadRetryOptions(0, 0.0),
                           serve_latest_good_version=fallback)
    manager.poll_once()
    assert manager.wait_until_settled(timeout=1)
    missing = manager.unavailable(include_empty=False)
    if fallback:
        assert missing == []
        assert serving_version(manager) == 1
        assert states(manager) == {2: (State.END, "attempt 1: variables missing"),
                                   1: (State.AVAILABLE, "")}
    else:
        assert missing == ["{name: m version: 2} due to error: DATA_LOSS: "
                           "attempt 1: variables missing"]
        assert sorted(states(manager)) == [2]


def test_latest_good_version_serves_while_the_newest_retries(tmp_path):
    """With the fallback, startup does not wait for the newest version's
    retries; once a retry succeeds, the newest version replaces the fallback."""
    base = tmp_path / "m"
    add_version(base, 1)
    add_version(base, 2)
    manager = make_manager(base, Loader({2: 1}), retry=LoadRetryOptions(5, 0.05),
                           serve_latest_good_version=True)
    manager.poll_once()
    assert manager.wait_until_settled(timeout=1)
    assert serving_version(manager) == 1
    assert states(manager)[2] == (State.LOADING, "")
    time.sleep(0.06)
    manager.retry_due()
    assert serving_version(manager) == 2
    assert states(manager)[1] == (State.END, "")


def test_a_model_moved_to_a_new_base_path_unloads_its_old_versions(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    add_version(old, 1)
    add_version(new, 5)
    manager = make_manager(old, Loader())
    manager.poll_once()
    first = manager.acquire("m")
    manager.release(first)
    config = model_server_config_pb2.ModelConfigList()
    config.config.add(name="m", base_path=str(new), model_platform="tensorflow")
    manager.set_config(config)
    manager.poll_once()
    assert first.closed
    assert serving_version(manager) == 5
    assert manager.model_names() == ["m"]
    assert manager._retired == []            # nothing left to unload


def test_drain_fails_status_but_serves_requests(tmp_path):
    base = tmp_path / "m"
    add_version(base, 1)
    manager = make_manager(base, Loader())
    manager.poll_once()
    manager.begin_drain()
    with pytest.raises(ServingError) as err:
        manager.status("m")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.message == "Server is shutting down"
    assert serving_version(manager) == 1
