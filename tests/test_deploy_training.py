"""deploy/k8s/training: the TFJob runs our CLI as the loopback tests do, on a shared volume."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "deploy" / "k8s" / "training"


def test_tfjob_runs_the_multi_worker_cli_on_the_shared_run_volume():
    from trainer.cli import parse_args
    from trainer.config import load_config

    job = yaml.safe_load((TRAINING / "tfjob-multi-worker.yaml").read_text())
    pvc = yaml.safe_load((TRAINING / "runs-pvc.yaml").read_text())
    assert job["kind"] == "TFJob" and job["apiVersion"] == "kubeflow.org/v1"
    workers = job["spec"]["tfReplicaSpecs"]["Worker"]
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "tensorflow"
    assert container["command"] == ["python", "-m", "trainer"]
    args = parse_args(container["args"])
    assert args.strategy == "multi_worker"
    assert "TF_CONFIG" not in {e["name"] for e in container["env"]}   # the operator's job
    (mount,) = container["volumeMounts"]
    assert str(args.output).startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]   # every worker reads the backup
    config = load_config(ROOT / str(args.config).removeprefix("/app/"), [])
    assert config.training.batch_size % workers["replicas"] == 0   # the global batch
