// Closed-loop gRPC load generator for benchmarks/serving_grpc.py.
//
// Keeps CONCURRENCY unary calls of METHOD in flight on one channel (one
// HTTP/2 connection, as a single grpc.aio channel would), sending
// pre-serialized request messages in turn, for WARMUP + SECONDS seconds; only
// calls started after the warm-up are counted.  One completion-queue thread
// drives every call, so the generator costs a few tens of microseconds of CPU
// per call instead of the ~0.35 ms of the Python client: on a 2-core machine
// the benchmark then measures the server, not its client.
//
// Requests file: records of <uint32 little-endian length><message bytes>.
// Prints one JSON object: calls, errors (by status code), elapsed_s, qps,
// p50_ms, p99_ms, mean_ms.
//
//   grpc_loadgen TARGET METHOD REQUESTS_FILE CONCURRENCY SECONDS [WARMUP_SECONDS]
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

std::vector<grpc::ByteBuffer> ReadRequests(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << "cannot open requests file " << path << "\n";
    std::exit(2);
  }
  std::vector<grpc::ByteBuffer> out;
  uint32_t len;
  while (in.read(reinterpret_cast<char*>(&len), sizeof(len))) {
    std::string bytes(len, '\0');
    if (!in.read(bytes.data(), len)) {
      std::cerr << path << ": truncated record " << out.size() << "\n";
      std::exit(2);
    }
    grpc::Slice slice(bytes);
    out.emplace_back(&slice, 1);
  }
  if (out.empty()) {
    std::cerr << path << ": no requests\n";
    std::exit(2);
  }
  return out;
}

struct Call {
  grpc::ClientContext context;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
  Clock::time_point started;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6 || std::string(argv[1]) == "--help") {
    std::cerr << "usage: grpc_loadgen TARGET METHOD REQUESTS_FILE CONCURRENCY SECONDS "
                 "[WARMUP_SECONDS]\n";
    return argc < 6 ? 2 : 0;
  }
  const std::string target = argv[1], method = argv[2];
  const auto requests = ReadRequests(argv[3]);
  const int concurrency = std::max(1, std::atoi(argv[4]));
  const double seconds = std::atof(argv[5]);
  const double warmup = argc > 6 ? std::atof(argv[6]) : 1.0;

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(30))) {
    std::cerr << "cannot connect to " << target << "\n";
    return 1;
  }
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;

  const auto begin = Clock::now();
  const auto measure_from = begin + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(warmup));
  const auto stop_at = measure_from + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(seconds));
  size_t next = 0;
  auto start = [&](std::unique_ptr<Call> call) {
    call->started = Clock::now();
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    call->reader = stub.PrepareUnaryCall(&call->context, method,
                                         requests[next++ % requests.size()], &cq);
    call->reader->StartCall();
    Call* raw = call.release();
    raw->reader->Finish(&raw->response, &raw->status, raw);
  };
  for (int i = 0; i < concurrency; ++i) start(std::make_unique<Call>());

  std::vector<double> latencies_ms;
  latencies_ms.reserve(1 << 20);
  std::map<int, long> errors;
  int in_flight = concurrency;
  void* tag;
  bool ok;
  while (in_flight > 0 && cq.Next(&tag, &ok)) {
    std::unique_ptr<Call> done(static_cast<Call*>(tag));
    const auto now = Clock::now();
    if (done->started >= measure_from && done->started < stop_at) {
      if (ok && done->status.ok()) {
        latencies_ms.push_back(
            std::chrono::duration<double, std::milli>(now - done->started).count());
      } else {
        ++errors[ok ? done->status.error_code() : -1];
      }
    }
    if (now < stop_at) {
      start(std::make_unique<Call>());
    } else {
      --in_flight;
    }
  }
  const double elapsed = std::chrono::duration<double>(stop_at - measure_from).count();
  std::sort(latencies_ms.begin(), latencies_ms.end());
  auto pct = [&](double p) {
    if (latencies_ms.empty()) return 0.0;
    size_t i = static_cast<size_t>(p / 100.0 * (latencies_ms.size() - 1) + 0.5);
    return latencies_ms[std::min(i, latencies_ms.size() - 1)];
  };
  double sum = 0;
  long error_count = 0;
  for (double v : latencies_ms) sum += v;
  std::printf("{\"calls\": %zu, \"errors\": {", latencies_ms.size());
  bool first = true;
  for (const auto& [code, n] : errors) {
    std::printf("%s\"%d\": %ld", first ? "" : ", ", code, n);
    first = false;
    error_count += n;
  }
  std::printf("}, \"error_count\": %ld, \"elapsed_s\": %.3f, \"qps\": %.1f, \"p50_ms\": %.4f, "
              "\"p99_ms\": %.4f, \"mean_ms\": %.4f}\n",
              error_count, elapsed, latencies_ms.size() / elapsed, pct(50), pct(99),
              latencies_ms.empty() ? 0.0 : sum / latencies_ms.size());
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return 0;
}
