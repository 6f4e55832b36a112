"""Benchmark: a 1M-item retrieval model through the project's server vs in-process.

Same model, same queries, same run:
- in-process: the SavedModel loaded as TF Serving loads it (session,
  SignatureDef names, a ``CallableOptions`` callable, the server's session
  options): single-query p50/p99, and batched throughput;
- served: two ``python -m serving`` subprocesses on loopback, one without and
  one with server-side batching, driven through TF Serving's gRPC ``Predict``
  at concurrency 1, 8 and 32 (and 64 with batching).

The load generator is ``benchmarks/loadgen/grpc_loadgen.cc`` (C++ gRPC,
compiled here on first use when g++ and libgrpc++-dev are installed): it costs
tens of microseconds of CPU per call, where the Python gRPC client costs about
0.35 ms, which on a 2-core machine would be charged to the server.  Without
it (or with ``--client python``) a closed-loop ``grpc.aio`` client is used.
Served answers are checked against the in-process ones before timing.

This machine is shared and noisy, so the two target comparisons are measured
in interleaved rounds (in-process, then served, then in-process, ...): each
served figure is compared with the mean of the in-process figures measured
just before and just after it, and the medians over rounds are reported.
For the latency target the server and the in-process model run pinned to the
last core and the load generator to the other(s), as a remote client would
(``--no-pin`` to share all cores); the unpinned figure is reported beside it.
Targets (issue 4): at concurrency 1 the server adds <= 1 ms to the in-process
p50; with batching at concurrency 32 it reaches >= 80 % of the in-process
batched throughput.

The batching server runs one batch thread by default (``--batch-threads``):
the model call is single-threaded at these batch sizes, so one batch thread
is compared with one in-process caller, and the front end (gRPC, decoding,
responses) gets the other core. Two batch threads on 2 cores measured slower
(the front end then competes with both model threads, and batches halve).
At concurrency 32 a closed loop keeps about half its requests in the running
batch and half in flight, so the server runs batches of ~16: the in-process
throughput at half the batch size is printed as that ceiling, and the
in-process throughput with one caller per core as the machine's capacity.

    python benchmarks/serving_grpc.py --model-base DIR   # DIR/retrieval/<version>/
    python benchmarks/serving_grpc.py --run RUN_DIR --items 1000000   # export first
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scann  # noqa: E402,F401
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,  # noqa: E402
                                     predict_pb2)

MODEL = "retrieval"
PREDICT = "/tensorflow.serving.PredictionService/Predict"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_queries(model_dir: Path, n: int) -> dict:
    """Raw user features for n queries, read from the run the model came from."""
    meta = json.loads((model_dir / "assets.extra" / "metadata.json").read_text())
    users = pd.read_parquet(Path(meta["run_dir"]) / "users.parquet").sample(
        n, replace=True, random_state=2)
    out = {}
    for f in meta["inputs"]:
        col = users[f["name"]]
        out[f["name"]] = (col.fillna("").astype(str).to_numpy(dtype=object)
                          if f["dtype"] == "string" else col.to_numpy(dtype=np.float32))
    return out


class InProcess:
    """The SavedModel in this process, loaded and run by the server's own
    :class:`~serving.servable.Servable` (session with the server's options, a
    ``CallableOptions`` callable by SignatureDef tensor names), so only the
    serving path separates the two."""

    def __init__(self, model_dir: Path, queries: dict):
        from serving.servable import Servable, session_config

        self._servable = Servable(MODEL, int(model_dir.name), str(model_dir),
                                  session_config()).load()
        self._signature = self._servable.signatures["serving_default"]
        self._queries = queries
        self._rows = len(next(iter(queries.values())))
        for i in range(10):
            self.run(i, i + 1)

    def run(self, start: int, stop: int) -> dict:
        sig = self._signature
        return self._servable.run(sig, {a: v[start:stop] for a, v in self._queries.items()},
                                  tuple(sig.output_aliases))

    def single(self, n: int, cpus: set | None = None) -> dict:
        """p50/p99 ms of ``n`` back-to-back single-query calls, on ``cpus`` if
        given (the session runs on the calling thread, which is pinned)."""
        times = []
        before = os.sched_getaffinity(0)
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:
            for i in range(n):
                t = time.perf_counter()
                self.run(i % self._rows, i % self._rows + 1)
                times.append((time.perf_counter() - t) * 1000)
        finally:
            os.sched_setaffinity(0, before)
        return {"p50_ms": float(np.percentile(times, 50)),
                "p99_ms": float(np.percentile(times, 99))}

    def batched_qps(self, batch: int, seconds: float) -> float:
        """Rows per second of back-to-back calls of ``batch`` rows."""
        self.run(0, batch)
        t, reps = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            s = (reps * batch) % (self._rows - batch)
            self.run(s, s + batch)
            reps += 1
        return reps * batch / (time.perf_counter() - t)

    def batched_qps_threads(self, batch: int, seconds: float, threads: int) -> float:
        """Rows per second of ``threads`` callers each running batches back to back."""
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(lambda _: self.batched_qps(batch, seconds), range(threads)))

    def close(self) -> None:
        self._servable.close()


def requests_for(queries: dict, n: int) -> list:
    out = []
    for i in range(n):
        req = predict_pb2.PredictRequest()
        req.model_spec.name = MODEL
        for k, v in queries.items():
            req.inputs[k].CopyFrom(tf.make_tensor_proto(v[i:i + 1]))
        out.append(req)
    return out


def write_request_records(reqs: list, path: Path) -> Path:
    """Serialized requests as <uint32 LE length><bytes> records (the load generator's input)."""
    with open(path, "wb") as f:
        for r in reqs:
            data = r.SerializeToString()
            f.write(struct.pack("<I", len(data)) + data)
    return path


def build_loadgen(work: Path) -> Path | None:
    """Compiles benchmarks/loadgen/grpc_loadgen.cc; None without g++ or grpc++."""
    source = ROOT / "benchmarks" / "loadgen" / "grpc_loadgen.cc"
    binary = work / "grpc_loadgen"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    if shutil.which("g++") is None or shutil.which("pkg-config") is None or \
            subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode != 0:
        return None
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], check=True,
                           capture_output=True, text=True).stdout.split()
    subprocess.run(["g++", "-O2", "-std=c++17", str(source), "-o", str(binary), *flags],
                   check=True)
    return binary


def drive_native(binary: Path, port: int, records: Path, concurrency: int,
                 seconds: float, cpus: set | None = None) -> dict:
    """Closed-loop load from the C++ generator (1 s warm-up, not counted),
    on ``cpus`` if given."""
    out = subprocess.run([str(binary), f"127.0.0.1:{port}", PREDICT, str(records),
                          str(concurrency), str(seconds), "1"],
                         check=True, capture_output=True, text=True, timeout=seconds + 120,
                         preexec_fn=pin_to(cpus))
    r = json.loads(out.stdout)
    return {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "qps": r["qps"],
            "errors": r["error_count"]}


async def drive_python(port: int, reqs: list, concurrency: int, seconds: float) -> dict:
    """Closed-loop load from ``concurrency`` grpc.aio workers on one channel.

    Requests are serialized once up front and responses are left as bytes, so
    this client spends as little CPU as a Python client can.
    """
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        predict = channel.unary_unary(PREDICT)
        reqs = [r.SerializeToString() for r in reqs]
        for r in reqs[:20]:
            await predict(r, timeout=30)
        latencies, errors = [], 0
        stop = time.perf_counter() + seconds

        async def worker(offset):
            nonlocal errors
            i = offset
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    await predict(reqs[i % len(reqs)], timeout=30)
                    latencies.append((time.perf_counter() - t) * 1000)
                except grpc.aio.AioRpcError:
                    errors += 1
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "qps": len(latencies) / elapsed, "errors": errors}


def check_answers(port: int, reqs: list, local: InProcess, n: int = 20) -> None:
    """The server's answers to the first ``n`` requests equal the in-process ones."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        predict = channel.unary_unary(PREDICT, request_serializer=lambda r: r.SerializeToString(),
                                      response_deserializer=predict_pb2.PredictResponse.FromString)
        for i, req in enumerate(reqs[:n]):
            got = predict(req, timeout=30)
            want = local.run(i, i + 1)
            ids = np.array(got.outputs["item_ids"].string_val, dtype=object)
            if list(ids) != list(want["item_ids"].ravel()):
                raise AssertionError(f"request {i}: served item_ids differ from in-process")
            np.testing.assert_allclose(np.array(got.outputs["scores"].float_val),
                                       want["scores"].ravel(), rtol=1e-5, atol=1e-6)


def pin_to(cpus: set | None):
    """A Popen ``preexec_fn`` that pins the child to ``cpus`` (None: no pinning)."""
    return None if not cpus else (lambda: os.sched_setaffinity(0, cpus))


def start_server(base: Path, port: int, batching_file: Path | None,
                 log_path: Path, cpus: set | None = None) -> subprocess.Popen:
    """``python -m serving`` on ``port`` (pinned to ``cpus`` if given), returned
    once the model is AVAILABLE."""
    cmd = [sys.executable, "-m", "serving", f"--port={port}", "--rest_api_port=0",
           f"--model_name={MODEL}", f"--model_base_path={base / MODEL}"]
    if batching_file is not None:
        cmd += ["--enable_batching", f"--batching_parameters_file={batching_file}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=pin_to(cpus))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            req = get_model_status_pb2.GetModelStatusRequest()
            req.model_spec.name = MODEL
            status = stub.GetModelStatus(req, timeout=2)
            if any(v.state == 30 for v in status.model_version_status):
                channel.close()
                return proc
        except grpc.RpcError:
            pass
        time.sleep(1)
    raise RuntimeError("server did not become ready")


def export_model(run_dir: Path, items: int, work: Path) -> Path:
    from export.exporter import ExportOptions, export_run
    from export.run_artifacts import load_run
    from trainer.data.synthetic import generate_catalog

    run = load_run(run_dir)
    extra = generate_catalog(max(0, items - len(run.items)), seed=0)
    catalog = pd.concat([run.items, extra[run.items.columns]], ignore_index=True)
    path = work / "items.parquet"
    catalog.to_parquet(path, index=False)
    export_run(run_dir, work / "models", ExportOptions(k=100, models=[MODEL],
                                                       items_path=str(path)))
    return work / "models"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-base", default=None, help="model base holding retrieval/<v>/")
    p.add_argument("--run", default=None, help="run dir to export from when no --model-base")
    p.add_argument("--items", type=int, default=1_000_000, help="catalog size to export")
    p.add_argument("--seconds", type=float, default=5.0, help="load duration per measurement")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds for the two target comparisons")
    p.add_argument("--batch", type=int, default=32, help="in-process batch / max_batch_size")
    p.add_argument("--batch-timeout-micros", type=int, default=1000)
    p.add_argument("--batch-threads", type=int, default=1,
                   help="num_batch_threads of the batching server (default 1; see above)")
    p.add_argument("--client", choices=("auto", "native", "python"), default="auto",
                   help="load generator: the C++ one (auto: when it can be built) or grpc.aio")
    p.add_argument("--no-pin", action="store_true",
                   help="latency target without CPU pinning (default: the server and the "
                        "in-process model on the last core, the load generator on the others)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    work = Path(args.output or tempfile.mkdtemp(prefix="bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model_base:
        base = Path(args.model_base)
    elif args.run:
        base = export_model(Path(args.run), args.items, work)
    else:
        p.error("give --model-base, or --run to export a model first")
    version = max(int(v.name) for v in (base / MODEL).iterdir() if v.name.isdigit())
    model_dir = base / MODEL / str(version)
    catalog = json.loads((model_dir / "assets.extra" / "metadata.json").read_text())[
        "catalog_size"]
    queries = load_queries(model_dir, 1024)
    reqs = requests_for(queries, 512)
    records = write_request_records(reqs, work / "requests.rec")

    loadgen = None if args.client == "python" else build_loadgen(work)
    if loadgen is None and args.client == "native":
        p.error("the C++ load generator needs g++, pkg-config and libgrpc++-dev")
    client = "C++ grpc_loadgen" if loadgen else "Python grpc.aio"
    print(f"load generator: {client}", flush=True)

    cores = sorted(os.sched_getaffinity(0))
    pin = loadgen is not None and not args.no_pin and len(cores) >= 2
    server_cpus, client_cpus = ({cores[-1]}, set(cores[:-1])) if pin else (None, None)

    def drive(port, conc, cpus=None):
        if loadgen is not None:
            return drive_native(loadgen, port, records, conc, args.seconds, cpus)
        return asyncio.run(drive_python(port, reqs, conc, args.seconds))

    batching = work / "batching.config"
    batching.write_text(f"max_batch_size {{ value: {args.batch} }}\n"
                        f"batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n"
                        f"num_batch_threads {{ value: {args.batch_threads} }}\n"
                        "max_enqueued_batches { value: 1000 }\n")
    local = InProcess(model_dir, queries)
    # "no batching, pinned": the latency target's server, alone on the last core
    # with the client on the others, as a remote client would be; the
    # in-process model it is compared with runs on that same core.
    labels = ["no batching", "batching"] + (["no batching, pinned"] if pin else [])
    ports = {label: free_port() for label in labels}
    procs = {label: start_server(base, port, batching if label == "batching" else None,
                                 work / f"server-{label.replace(' ', '-').replace(',', '')}.log",
                                 server_cpus if label.endswith("pinned") else None)
             for label, port in ports.items()}
    c1_server = "no batching, pinned" if pin else "no batching"
    rows = []
    try:
        for label, port in ports.items():
            check_answers(port, reqs, local)
        print("served answers equal in-process answers (20 requests, every server)", flush=True)
        for label, port in ports.items():   # warm both servers
            drive(port, 8)

        def record(label, conc, r):
            rows.append({"server": label, "concurrency": conc, **r})
            print(f"{label:12s} c={conc:2d}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                  f"QPS {r['qps']:.0f}, errors {r['errors']}", flush=True)

        # Target 1: in-process single query vs served at concurrency 1.
        def served_c1_round():
            pinned = drive(ports[c1_server], 1, client_cpus)
            return pinned, (drive(ports["no batching"], 1) if pin else None)

        def show_c1(single, served):
            line = (f"round: in-process p50 {single['p50_ms']:.2f} ms | served c=1 p50 "
                    f"{served[0]['p50_ms']:.2f} ms")
            if pin:
                line += f" | unpinned c=1 p50 {served[1]['p50_ms']:.2f} ms"
            print(line, flush=True)

        singles, c1_rounds = interleave(args.rounds, lambda: local.single(300, server_cpus),
                                        served_c1_round, show_c1)
        served_c1 = [r[0] for r in c1_rounds]
        unpinned_c1 = [r[1] for r in c1_rounds] if pin else []

        # Target 2: in-process batched vs served with batching at 32 (and at 64,
        # not a target: enough requests to fill batches of 32 while as many are
        # in flight).
        half = args.batch // 2

        def show_c32(local_qps, served):
            print(f"round: in-process batch-{args.batch} QPS {local_qps[0]:.0f} | "
                  f"batch-{half} QPS {local_qps[1]:.0f} | served batching c=32 QPS "
                  f"{served[0]['qps']:.0f} | c=64 QPS {served[1]['qps']:.0f}", flush=True)

        local_qps, c32_rounds = interleave(
            args.rounds,
            lambda: (local.batched_qps(args.batch, args.seconds),
                     local.batched_qps(half, args.seconds)),
            lambda: (drive(ports["batching"], 32), drive(ports["batching"], 64)),
            show_c32)
        batched = [q[0] for q in local_qps]
        half_batched = [q[1] for q in local_qps]
        served_c32 = [r[0] for r in c32_rounds]
        served_c64 = [r[1] for r in c32_rounds]
        all_cores = local.batched_qps_threads(args.batch, args.seconds, len(cores))
        record(c1_server, 1, median_row(served_c1))
        if pin:
            record("no batching", 1, median_row(unpinned_c1))
        for conc in (8, 32):
            record("no batching", conc, drive(ports["no batching"], conc))
        for conc in (1, 8):
            record("batching", conc, drive(ports["batching"], conc))
        record("batching", 32, median_row(served_c32))
        record("batching", 64, median_row(served_c64))
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=60)
        local.close()

    single = {k: float(np.median([s[k] for s in singles])) for k in ("p50_ms", "p99_ms")}
    where = (f" (server and in-process model on CPU {cores[-1]}, client on CPU "
             f"{','.join(map(str, cores[:-1]))})" if pin else "")
    batched_qps = float(np.median(batched))
    table = ["| path | concurrency | p50 ms | p99 ms | QPS | errors |", "|---|---|---|---|---|---|",
             f"| in-process, single query | 1 | {single['p50_ms']:.2f} | {single['p99_ms']:.2f} | "
             f"{1000 / single['p50_ms']:.0f} | 0 |",
             f"| in-process, batch {args.batch} | - | - | - | {batched_qps:.0f} | 0 |",
             f"| in-process, batch {half} (the ceiling at concurrency 32, see above) | - | - | - | "
             f"{np.median(half_batched):.0f} | 0 |",
             f"| in-process, batch {args.batch}, {len(cores)} callers (all cores) | - | - | - | "
             f"{all_cores:.0f} | 0 |"]
    table += [f"| gRPC, {r['server']} | {r['concurrency']} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['qps']:.0f} | {r['errors']} |" for r in rows]
    # Each served measurement is compared with the mean of the in-process
    # measurements just before and just after it, which cancels drift.
    single_p50 = bracket([s["p50_ms"] for s in singles])
    added = [s["p50_ms"] - l for s, l in zip(served_c1, single_p50)]
    shares = [s["qps"] / b for s, b in zip(served_c32, bracket(batched))]
    ceiling_shares = [s["qps"] / b for s, b in zip(served_c32, bracket(half_batched))]
    shares_c64 = [s["qps"] / b for s, b in zip(served_c64, bracket(batched))]
    added_med, share_med = float(np.median(added)), float(np.median(shares))
    served_c32_med = float(np.median([s["qps"] for s in served_c32]))
    verdict = (f"Targets (medians over {args.rounds} interleaved rounds): the server adds "
               f"{added_med:.2f} ms to the in-process p50 at concurrency 1{where} (per round: "
               f"{', '.join(f'{a:.2f}' for a in added)}; <= 1 ms: "
               f"{'met' if added_med <= 1 else 'MISSED'}); batching at concurrency 32 reaches "
               f"{share_med:.0%} of in-process batched QPS (per round: "
               f"{', '.join(f'{s:.0%}' for s in shares)}; >= 80%: "
               f"{'met' if share_med >= 0.8 else 'MISSED'}); that is "
               f"{np.median(ceiling_shares):.0%} of in-process batch-{half} QPS "
               f"and {served_c32_med / all_cores:.0%} of the in-process all-cores QPS. At "
               f"concurrency 64 (not a target) batching reaches {np.median(shares_c64):.0%} of "
               f"in-process batched QPS.")
    if pin:
        unpinned = [u["p50_ms"] - l for u, l in zip(unpinned_c1, single_p50)]
        verdict += (f" Unpinned, with the client on the same cores, the server adds "
                    f"{np.median(unpinned):.2f} ms.")
    text = "\n".join([f"# Serving {MODEL} ({catalog:,} items) through gRPC vs in-process", "",
                      f"Load generator: {client}; {args.seconds:g} s per measurement; "
                      f"batching: max_batch_size {args.batch}, batch_timeout_micros "
                      f"{args.batch_timeout_micros}, num_batch_threads {args.batch_threads}.", "",
                      *table, "", verdict, ""])
    print("\n" + text)
    (work / "results.md").write_text(text)
    (work / "results.json").write_text(json.dumps(
        {"client": client, "pinned": pin, "in_process_single": singles,
         "in_process_batched_qps": batched, "in_process_half_batched_qps": half_batched,
         "in_process_all_cores_qps": all_cores, "served_c1": served_c1,
         "unpinned_c1": unpinned_c1, "served_batching_c32": served_c32,
         "served_batching_c64": served_c64, "served": rows,
         "added_ms": added, "batched_share": shares, "batched_share_c64": shares_c64},
        indent=2))
    print(f"written to {work}")
    return 0


def interleave(rounds: int, in_process, served, show):
    """in-process, served, in-process, ..., in-process: ``rounds`` served
    measurements, each between two in-process ones (``rounds + 1`` of them,
    for :func:`bracket`); ``show(in_process_before, served)`` prints a round."""
    local, remote = [in_process()], []
    for _ in range(rounds):
        remote.append(served())
        show(local[-1], remote[-1])
        local.append(in_process())
    return local, remote


def bracket(values: list) -> list:
    """Means of neighbours: n + 1 measurements around n rounds -> n baselines."""
    return [(a + b) / 2 for a, b in zip(values, values[1:])]


def median_row(runs: list) -> dict:
    """Per-key median of several measurements of one setting (errors summed)."""
    out = {k: float(np.median([r[k] for r in runs])) for k in ("p50_ms", "p99_ms", "qps")}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


if __name__ == "__main__":
    sys.exit(main())
