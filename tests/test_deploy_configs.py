"""deploy/: every config parses as TF Serving's protos; compose and k8s reference them."""
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.config_protos import BatchingParameters, MonitoringConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALL = {"query_tower", "candidate_tower", "retrieval", "retrieval_exact"}
STOCK = {"query_tower", "candidate_tower", "retrieval_exact"}
MODEL_CONFIGS = {"models.config": ALL, "models.scann.config": {"retrieval"},
                 "models.stock.config": STOCK}


def parse(name, message):
    return text_format.Parse((DEPLOY / name).read_text(), message)


@pytest.mark.parametrize("name,models", sorted(MODEL_CONFIGS.items()))
def test_model_server_configs(name, models):
    cfg = parse(name, model_server_config_pb2.ModelServerConfig())
    configs = cfg.model_config_list.config
    assert {c.name for c in configs} == models and len(configs) == len(models)
    for c in configs:
        assert c.base_path == f"/models/{c.name}"
        assert c.model_platform == "tensorflow"
        assert c.model_version_policy.WhichOneof("policy_choice") == "latest"
        assert c.model_version_policy.latest.num_versions == 1


def test_the_two_services_split_the_four_models():
    assert MODEL_CONFIGS["models.scann.config"] | MODEL_CONFIGS["models.stock.config"] == ALL
    assert not MODEL_CONFIGS["models.scann.config"] & MODEL_CONFIGS["models.stock.config"]


def test_batching_config():
    b = parse("batching.config", BatchingParameters())
    assert b.max_batch_size.value == 64 and b.batch_timeout_micros.value > 0
    assert b.max_enqueued_batches.value > 0 and b.num_batch_threads.value > 0
    sizes = list(b.allowed_batch_sizes)
    assert sizes == sorted(set(sizes)) and sizes[-1] == b.max_batch_size.value
    assert b.pad_variable_length_inputs


def test_monitoring_config():
    m = parse("monitoring.config", MonitoringConfig())
    assert m.prometheus_config.enable
    assert m.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_malformed_text_proto_is_rejected():
    # guards the tests above: the parser really checks field names
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_sise { value: 1 }", BatchingParameters())


def _flags(args):
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_docker_compose():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"retrieval-scann", "tf-serving"}
    assert "tf-serving-scann" in services["retrieval-scann"]["image"]
    assert services["tf-serving"]["image"].startswith("tensorflow/serving:")
    expected = {"retrieval-scann": "models.scann.config", "tf-serving": "models.stock.config"}
    for name, svc in services.items():
        flags = _flags(svc["command"])
        assert flags["model_config_file"] == f"/config/{expected[name]}"
        assert flags["batching_parameters_file"] == "/config/batching.config"
        assert flags["monitoring_config_file"] == "/config/monitoring.config"
        assert flags["port"] == "8500" and flags["rest_api_port"] == "8501"
        mounts = {}
        for volume in svc["volumes"]:
            parts = volume.split(":")
            if parts[-1] in ("ro", "rw"):
                parts = parts[:-1]
            mounts[parts[-1]] = ":".join(parts[:-1])
        assert mounts["/models"] == "${MODEL_BASE:-../models}"
        for path in (flags["model_config_file"], flags["batching_parameters_file"],
                     flags["monitoring_config_file"]):
            src = mounts[path]
            assert (DEPLOY / src).is_file(), f"{name}: {src} missing"
            assert Path(src).name == Path(path).name
    ports = [p for svc in services.values() for p in svc["ports"]]
    assert len({p.split(":")[0] for p in ports}) == len(ports)   # no host port clash


def _k8s():
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_k8s_configmap_matches_the_config_files():
    cm = _k8s()[("ConfigMap", "twotower-serving-config")]
    assert set(cm["data"]) == {"models.scann.config", "models.stock.config",
                               "batching.config", "monitoring.config"}
    for name, text in cm["data"].items():
        assert text == (DEPLOY / name).read_text(), f"{name} differs from deploy/{name}"


@pytest.mark.parametrize("name,config,probe_model", [
    ("retrieval-scann", "models.scann.config", "retrieval"),
    ("tf-serving", "models.stock.config", "retrieval_exact"),
])
def test_k8s_deployments_and_services(name, config, probe_model):
    docs = _k8s()
    dep, svc = docs[("Deployment", name)], docs[("Service", name)]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert all(pod["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
    (container,) = pod["spec"]["containers"]
    flags = _flags(container["args"])
    assert flags["model_config_file"] == f"/config/{config}"
    assert flags["batching_parameters_file"] == "/config/batching.config"
    assert flags["monitoring_config_file"] == "/config/monitoring.config"
    assert probe_model in MODEL_CONFIGS[config]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == f"/v1/models/{probe_model}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8500, "http": 8501} and probe["port"] in ("http", 8501)
    assert container["resources"]["requests"]["cpu"] and \
        container["resources"]["requests"]["memory"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"models": "/models", "config": "/config"}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "twotower-serving-config"
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"grpc", "http"}
    image = container["image"]
    assert ("tf-serving-scann" in image) == (name == "retrieval-scann")


@pytest.mark.parametrize("name", ["retrieval-scann", "tf-serving"])
def test_k8s_rollout_drains(name):
    """tensorflow_model_server ignores SIGTERM: the preStop sleep is the drain,
    and the kubelet must not SIGKILL before it ends."""
    pod = _k8s()[("Deployment", name)]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep"
    sleep = int(command[1])
    assert sleep >= 10   # endpoint removal propagates, in-flight calls finish
    assert sleep < pod["terminationGracePeriodSeconds"] <= sleep + 10
