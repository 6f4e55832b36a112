"""Version lifecycle: hot swap, failed loads, warmup, reload config, SIGTERM."""
import os
import signal
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2, predict_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving_harness import Server, install_version, statuses, wait_for
from serving_models import write_warmup

State = get_model_status_pb2.ModelVersionStatus.State


def predict_request(name="m"):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.inputs["user_id"].CopyFrom(tf.make_tensor_proto(["u1"]))
    req.inputs["age"].CopyFrom(tf.make_tensor_proto([30.0], tf.float32))
    return req


def test_hot_swap_and_failed_version(start_server, templates, tmp_path):
    base = str(tmp_path / "m")
    install_version(templates[1], base, 1)
    server = start_server("--model_name=m", f"--model_base_path={base}",
                          "--file_system_poll_wait_seconds=0.2", "--max_num_load_retries=0")
    predict, models = server.stubs()
    assert statuses(models)[1].state == State.AVAILABLE

    failures, versions, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                versions.append(predict.Predict(predict_request(), timeout=10)
                                .model_spec.version.value)
            except grpc.RpcError as err:  # any failure during the swap is a bug
                failures.append(err)

    client = threading.Thread(target=loop)
    client.start()
    try:
        wait_for(lambda: len(versions) > 5, what="first answers")
        install_version(templates[2], base, 2)
        wait_for(lambda: versions and versions[-1] == 2, what="version 2 serving")
        wait_for(lambda: statuses(models)[1].state == State.END, what="version 1 unloaded")
        st = statuses(models)
        assert st[2].state == State.AVAILABLE
        assert st[1].status.error_code == 0          # unloaded, not failed

        # a corrupt version 3 never replaces the working version 2
        bad = os.path.join(base, ".tmp-3")
        os.makedirs(bad)
        with open(os.path.join(bad, "saved_model.pb"), "wb") as f:
            f.write(b"this is not a SavedModel")
        os.rename(bad, os.path.join(base, "3"))
        wait_for(lambda: 3 in statuses(models) and statuses(models)[3].state == State.END,
                 what="version 3 failed")
        n = len(versions)
        wait_for(lambda: len(versions) > n + 5, what="answers after the failed load")
    finally:
        stop.set()
        client.join()
    assert not failures, failures[0]
    st = statuses(models)
    assert st[3].status.error_code != 0 and st[3].status.error_message
    assert st[2].state == State.AVAILABLE
    assert versions[-1] == 2
    assert sorted(set(versions)) == [1, 2]


def test_failing_warmup_fails_the_load(start_server, templates, tmp_path):
    base = str(tmp_path / "m")
    install_version(templates[1], base, 1)
    server = start_server("--model_name=m", f"--model_base_path={base}",
                          "--file_system_poll_wait_seconds=0.2", "--max_num_load_retries=0")
    predict, models = server.stubs()
    v2 = install_version(templates[1], str(tmp_path / "staging"), 2)
    write_warmup(v2, 1, broken=True)
    os.rename(v2, os.path.join(base, "2"))
    wait_for(lambda: 2 in statuses(models) and statuses(models)[2].state == State.END,
             what="version 2 failed")
    st = statuses(models)
    assert "Warmup record 0 failed" in st[2].status.error_message
    assert st[2].status.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert st[1].state == State.AVAILABLE   # no aspired version serves: keep the old one
    assert predict.Predict(predict_request(), timeout=10).model_spec.version.value == 1


def test_reload_config_and_sigterm(start_server, templates, tmp_path):
    base_a, base_b = str(tmp_path / "a"), str(tmp_path / "b")
    install_version(templates[1], base_a, 1)
    install_version(templates[2], base_b, 4)
    server = start_server("--model_name=a", f"--model_base_path={base_a}",
                          "--max_num_load_retries=0")
    predict, models = server.stubs()

    def reload(*names):
        req = model_management_pb2.ReloadConfigRequest()
        for name in names:
            cfg = req.config.model_config_list.config.add()
            cfg.name, cfg.base_path = name, {"a": base_a, "b": base_b}[name]
            cfg.model_platform = "tensorflow"
        return models.HandleReloadConfigRequest(req, timeout=60)

    assert reload("a", "b").status.error_code == 0
    assert predict.Predict(predict_request("b"), timeout=10).model_spec.version.value == 4
    assert reload("b").status.error_code == 0
    with pytest.raises(grpc.RpcError) as err:
        predict.Predict(predict_request("a"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    bad = model_management_pb2.ReloadConfigRequest()
    bad.config.model_config_list.config.add(name="c", base_path=base_a, model_platform="pytorch")
    with pytest.raises(grpc.RpcError) as err:
        models.HandleReloadConfigRequest(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # a model that fails to load fails the reload (UNKNOWN, as TF Serving); the others serve
    corrupt = tmp_path / "c" / "3"
    corrupt.mkdir(parents=True)
    (corrupt / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    failing = model_management_pb2.ReloadConfigRequest()
    failing.config.model_config_list.config.add(name="b", base_path=base_b,
                                                model_platform="tensorflow")
    failing.config.model_config_list.config.add(name="c", base_path=str(corrupt.parent),
                                                model_platform="tensorflow")
    with pytest.raises(grpc.RpcError) as err:
        models.HandleReloadConfigRequest(failing, timeout=60)
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert err.value.details().startswith(
        "1 model(s) did not become available: {{{name: c version: 3} due to error: ")
    assert predict.Predict(predict_request("b"), timeout=10).model_spec.version.value == 4

    # SIGTERM: exits 0, ports closed
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log()
    assert "Server stopped" in server.log()
    with pytest.raises(grpc.RpcError):
        predict.Predict(predict_request("b"), timeout=2)


def test_model_config_file_polling(start_server, templates, tmp_path):
    base_a, base_b = str(tmp_path / "a"), str(tmp_path / "b")
    install_version(templates[1], base_a, 1)
    install_version(templates[2], base_b, 1)
    config = tmp_path / "models.config"

    def write(*names):
        cfg = model_server_config_pb2.ModelServerConfig()
        for name in names:
            cfg.model_config_list.config.add(name=name, base_path={"a": base_a, "b": base_b}[name],
                                             model_platform="tensorflow")
        config.write_text(str(cfg))

    write("a")
    server = start_server(f"--model_config_file={config}",
                          "--model_config_file_poll_wait_seconds=0.3")
    predict, _ = server.stubs()
    write("a", "b")

    def b_serves():
        try:
            predict.Predict(predict_request("b"), timeout=5)
            return True
        except grpc.RpcError:
            return False

    wait_for(b_serves, what="model b from the re-read config file")
    assert np.asarray(tf.make_ndarray(
        predict.Predict(predict_request("a"), timeout=5).outputs["scores"])).shape == (1, 3)


def test_startup_fails_when_a_model_cannot_load(templates, tmp_path):
    """As tensorflow_model_server: a configured model whose aspired versions all
    fail to load stops the server from starting, with upstream's message --
    also when an older, good version is on disk (latest {1} aspires only the
    newest; --serve_latest_good_version, tested in test_serving_faults.py,
    serves the older one instead)."""
    base = tmp_path / "m"
    install_version(templates[1], str(base), 1)
    corrupt = base / "2"
    corrupt.mkdir()
    (corrupt / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    server = Server(["--model_name=m", f"--model_base_path={base}",
                     "--max_num_load_retries=0"],
                    str(tmp_path / "server.log"))
    assert server.proc.wait(timeout=120) == 1
    assert ("Failed to start server. Error: UNKNOWN: 1 servable(s) did not become "
            "available: {{{name: m version: 2} due to error: ") in server.log()
