// savedmodel_check: load a SavedModel the way TF Serving does and replay its
// warmup requests, with no Python in the loop.
//
// TF Serving's model server loads a version directory with
// tensorflow::LoadSavedModel (tag "serve") into a session, then replays
// <dir>/assets.extra/tf_serving_warmup_requests: a TFRecord file of serialized
// tensorflow.serving.PredictionLog messages. This program does the same, so a
// SavedModel that passes here has no Python-only ops (tf.py_function is
// refused with FAILED_PRECONDITION) and runs on the C++ runtime, given the
// custom op libraries (e.g. ScaNN's) that are passed with --op_library.
//
// The TF Serving protos are not in the TensorFlow wheel, so PredictionLog is
// decoded by hand with CodedInputStream. Field numbers, checked against
// tensorflow_serving/apis/{prediction_log,predict,model}.proto:
//   PredictionLog.predict_log      = 6   (PredictLog)
//   PredictLog.request             = 1   (PredictRequest)
//   PredictRequest.model_spec      = 1   (ModelSpec)
//   PredictRequest.inputs          = 2   (map<string, TensorProto>:
//                                         entry key = 1, value = 2)
//   PredictRequest.output_filter   = 3   (repeated string)
//   ModelSpec.name = 1, ModelSpec.signature_name = 3
//
// Output: one JSON line per warmup request on stdout,
//   {"index": i, "model": ..., "signature": ..., "outputs": {alias:
//     {"name": tensor, "dtype": "float32", "shape": [..], "values": [..],
//      "truncated": bool}}}
// Errors go to stderr as "ERROR: <status>" with a non-zero exit code:
//   1 usage, 2 op library, 3 load, 4 warmup file/parse, 5 run.
//
// Build: see export/native_loader.py (build_checker) and ../shared/GUIDE.md §1.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "google/protobuf/io/coded_stream.h"
#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor.pb.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/lib/io/record_reader.h"
#include "tensorflow/core/platform/env.h"
#include "tensorflow/core/protobuf/meta_graph.pb.h"
#include "tensorflow/core/public/session.h"

namespace {

using google::protobuf::io::CodedInputStream;

constexpr int kMaxWarmupRecords = 1000;  // TF Serving's own cap.
constexpr char kDefaultSignature[] = "serving_default";

// Exit codes.
constexpr int kExitUsage = 1;
constexpr int kExitOpLibrary = 2;
constexpr int kExitLoad = 3;
constexpr int kExitWarmup = 4;
constexpr int kExitRun = 5;

int Fail(int code, const std::string& what) {
  std::fprintf(stderr, "ERROR: %s\n", what.c_str());
  return code;
}

// ---------------------------------------------------------------------------
// Hand-rolled protobuf wire-format walking.

struct WarmupRequest {
  std::string model_name;
  std::string signature_name;
  std::vector<std::pair<std::string, std::string>> inputs;  // alias, bytes
  std::vector<std::string> output_filter;
};

// Skips one field whose tag was just read. Returns false on malformed input.
bool SkipField(CodedInputStream* in, uint32_t tag) {
  switch (tag & 7) {
    case 0: {  // varint
      uint64_t v;
      return in->ReadVarint64(&v);
    }
    case 1:  // fixed64
      return in->Skip(8);
    case 2: {  // length-delimited
      uint32_t len;
      return in->ReadVarint32(&len) && in->Skip(static_cast<int>(len));
    }
    case 5:  // fixed32
      return in->Skip(4);
    default:  // groups (3, 4) are not used by these protos
      return false;
  }
}

bool ReadBytes(CodedInputStream* in, std::string* out) {
  uint32_t len;
  return in->ReadVarint32(&len) && in->ReadString(out, static_cast<int>(len));
}

// Calls fn(field_number, wire_type, in) for each field of the message in
// `bytes`; fn returns false on error. Unhandled fields must be skipped by fn
// (returning SkipField(...)).
template <typename Fn>
bool WalkMessage(const std::string& bytes, Fn fn) {
  CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                      static_cast<int>(bytes.size()));
  in.SetRecursionLimit(100);
  while (true) {
    uint32_t tag = in.ReadTag();
    if (tag == 0) return in.ConsumedEntireMessage();
    if (!fn(tag >> 3, tag & 7, tag, &in)) return false;
  }
}

bool ParseModelSpec(const std::string& bytes, WarmupRequest* req) {
  return WalkMessage(bytes, [&](uint32_t field, uint32_t wt, uint32_t tag,
                                CodedInputStream* in) {
    if (field == 1 && wt == 2) return ReadBytes(in, &req->model_name);
    if (field == 3 && wt == 2) return ReadBytes(in, &req->signature_name);
    return SkipField(in, tag);
  });
}

bool ParseInputsEntry(const std::string& bytes, WarmupRequest* req) {
  std::string key, value;
  bool ok = WalkMessage(bytes, [&](uint32_t field, uint32_t wt, uint32_t tag,
                                   CodedInputStream* in) {
    if (field == 1 && wt == 2) return ReadBytes(in, &key);
    if (field == 2 && wt == 2) return ReadBytes(in, &value);
    return SkipField(in, tag);
  });
  if (ok) req->inputs.emplace_back(std::move(key), std::move(value));
  return ok;
}

bool ParsePredictRequest(const std::string& bytes, WarmupRequest* req) {
  return WalkMessage(bytes, [&](uint32_t field, uint32_t wt, uint32_t tag,
                                CodedInputStream* in) {
    std::string sub;
    if (field == 1 && wt == 2)
      return ReadBytes(in, &sub) && ParseModelSpec(sub, req);
    if (field == 2 && wt == 2)
      return ReadBytes(in, &sub) && ParseInputsEntry(sub, req);
    if (field == 3 && wt == 2) {
      if (!ReadBytes(in, &sub)) return false;
      req->output_filter.push_back(sub);
      return true;
    }
    return SkipField(in, tag);
  });
}

// Returns "" on success, else an error message.
std::string ParsePredictionLog(const std::string& bytes, WarmupRequest* req) {
  std::string predict_log;
  bool has_predict_log = false;
  int other_log_field = 0;
  bool ok = WalkMessage(bytes, [&](uint32_t field, uint32_t wt, uint32_t tag,
                                   CodedInputStream* in) {
    if (field == 6 && wt == 2) {
      has_predict_log = true;
      return ReadBytes(in, &predict_log);
    }
    if (field >= 2 && field <= 7) other_log_field = static_cast<int>(field);
    return SkipField(in, tag);
  });
  if (!ok) return "malformed PredictionLog";
  if (!has_predict_log) {
    return "unsupported log type (PredictionLog field " +
           std::to_string(other_log_field) + "); only predict_log is supported";
  }
  std::string request;
  bool has_request = false;
  ok = WalkMessage(predict_log, [&](uint32_t field, uint32_t wt, uint32_t tag,
                                    CodedInputStream* in) {
    if (field == 1 && wt == 2) {
      has_request = true;
      return ReadBytes(in, &request);
    }
    return SkipField(in, tag);
  });
  if (!ok) return "malformed PredictLog";
  if (!has_request) return "PredictLog has no request";
  if (!ParsePredictRequest(request, req)) return "malformed PredictRequest";
  return "";
}

// ---------------------------------------------------------------------------
// JSON output.

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);  // UTF-8 passes through.
        }
    }
  }
  return out + "\"";
}

std::string JsonNumber(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

std::string DtypeName(tensorflow::DataType dt) {
  switch (dt) {
    case tensorflow::DT_FLOAT: return "float32";
    case tensorflow::DT_DOUBLE: return "float64";
    case tensorflow::DT_HALF: return "float16";
    case tensorflow::DT_BFLOAT16: return "bfloat16";
    case tensorflow::DT_INT8: return "int8";
    case tensorflow::DT_INT16: return "int16";
    case tensorflow::DT_INT32: return "int32";
    case tensorflow::DT_INT64: return "int64";
    case tensorflow::DT_UINT8: return "uint8";
    case tensorflow::DT_UINT16: return "uint16";
    case tensorflow::DT_UINT32: return "uint32";
    case tensorflow::DT_UINT64: return "uint64";
    case tensorflow::DT_BOOL: return "bool";
    case tensorflow::DT_STRING: return "string";
    default: return tensorflow::DataTypeString(dt);
  }
}

template <typename T>
void AppendNumbers(const tensorflow::Tensor& t, int64_t n, std::string* out) {
  auto flat = t.flat<T>();
  for (int64_t i = 0; i < n; ++i) {
    if (i) *out += ",";
    *out += JsonNumber(static_cast<double>(flat(i)));
  }
}

template <typename T>
void AppendIntegers(const tensorflow::Tensor& t, int64_t n, std::string* out) {
  auto flat = t.flat<T>();
  for (int64_t i = 0; i < n; ++i) {
    if (i) *out += ",";
    *out += std::to_string(flat(i));
  }
}

// Returns the JSON "values" array of the first n elements, or "" when the
// dtype is not printed.
std::string JsonValues(const tensorflow::Tensor& t, int64_t n) {
  std::string out = "[";
  switch (t.dtype()) {
    case tensorflow::DT_FLOAT: AppendNumbers<float>(t, n, &out); break;
    case tensorflow::DT_DOUBLE: AppendNumbers<double>(t, n, &out); break;
    case tensorflow::DT_INT8: AppendIntegers<int8_t>(t, n, &out); break;
    case tensorflow::DT_INT16: AppendIntegers<int16_t>(t, n, &out); break;
    case tensorflow::DT_INT32: AppendIntegers<int32_t>(t, n, &out); break;
    case tensorflow::DT_INT64: AppendIntegers<int64_t>(t, n, &out); break;
    case tensorflow::DT_UINT8: AppendIntegers<uint8_t>(t, n, &out); break;
    case tensorflow::DT_UINT16: AppendIntegers<uint16_t>(t, n, &out); break;
    case tensorflow::DT_UINT32: AppendIntegers<uint32_t>(t, n, &out); break;
    case tensorflow::DT_UINT64: AppendIntegers<uint64_t>(t, n, &out); break;
    case tensorflow::DT_BOOL: {
      auto flat = t.flat<bool>();
      for (int64_t i = 0; i < n; ++i) {
        if (i) out += ",";
        out += flat(i) ? "true" : "false";
      }
      break;
    }
    case tensorflow::DT_STRING: {
      auto flat = t.flat<tensorflow::tstring>();
      for (int64_t i = 0; i < n; ++i) {
        if (i) out += ",";
        out += JsonString(std::string(flat(i).data(), flat(i).size()));
      }
      break;
    }
    default:
      return "";
  }
  return out + "]";
}

std::string JsonTensor(const std::string& tensor_name, const tensorflow::Tensor& t,
                       int64_t max_values) {
  std::string out = "{\"name\":" + JsonString(tensor_name) +
                    ",\"dtype\":" + JsonString(DtypeName(t.dtype())) +
                    ",\"shape\":[";
  for (int d = 0; d < t.dims(); ++d) {
    if (d) out += ",";
    out += std::to_string(t.dim_size(d));
  }
  out += "]";
  const int64_t total = t.NumElements();
  const int64_t n = std::min<int64_t>(total, std::max<int64_t>(max_values, 0));
  std::string values = JsonValues(t, n);
  if (!values.empty()) {
    out += ",\"values\":" + values;
    out += std::string(",\"truncated\":") + (n < total ? "true" : "false");
  }
  return out + "}";
}

// ---------------------------------------------------------------------------

void Usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--op_library=PATH]... [--warmup=PATH] "
               "[--max_values=N] [--allow_missing_warmup] [--tags=serve] "
               "SAVED_MODEL_DIR\n"
               "Loads SAVED_MODEL_DIR with tensorflow::LoadSavedModel, replays "
               "its TF Serving warmup requests\n"
               "(default SAVED_MODEL_DIR/assets.extra/tf_serving_warmup_requests) "
               "and prints one JSON line per request.\n",
               argv0);
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

int Main(int argc, char** argv) {
  std::vector<std::string> op_libraries;
  std::string warmup_path, export_dir;
  std::unordered_set<std::string> tags;
  int64_t max_values = 16;
  bool allow_missing_warmup = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      Usage(argv[0]);
      return 0;
    } else if (StartsWith(a, "--op_library=")) {
      op_libraries.push_back(a.substr(13));
    } else if (StartsWith(a, "--warmup=")) {
      warmup_path = a.substr(9);
    } else if (StartsWith(a, "--max_values=")) {
      max_values = std::atoll(a.substr(13).c_str());
    } else if (StartsWith(a, "--tags=")) {
      std::stringstream ss(a.substr(7));
      std::string tag;
      while (std::getline(ss, tag, ',')) if (!tag.empty()) tags.insert(tag);
    } else if (a == "--allow_missing_warmup") {
      allow_missing_warmup = true;
    } else if (StartsWith(a, "--")) {
      Usage(argv[0]);
      return Fail(kExitUsage, "unknown flag " + a);
    } else if (export_dir.empty()) {
      export_dir = a;
    } else {
      Usage(argv[0]);
      return Fail(kExitUsage, "more than one SavedModel directory given");
    }
  }
  if (export_dir.empty()) {
    Usage(argv[0]);
    return Fail(kExitUsage, "no SavedModel directory given");
  }
  if (tags.empty()) tags.insert("serve");
  if (warmup_path.empty()) {
    warmup_path = export_dir + "/assets.extra/tf_serving_warmup_requests";
  }

  tensorflow::Env* env = tensorflow::Env::Default();

  // 1. Custom op libraries: their static initializers register the ops and
  //    kernels, so this must happen before the graph is imported.
  for (const std::string& lib : op_libraries) {
    void* handle = nullptr;
    absl::Status s = env->LoadDynamicLibrary(lib.c_str(), &handle);
    if (!s.ok()) {
      return Fail(kExitOpLibrary,
                  "loading op library " + lib + ": " + s.ToString());
    }
  }

  // 2. The SavedModel, exactly as TF Serving's SavedModelBundle loader does.
  tensorflow::SavedModelBundle bundle;
  tensorflow::SessionOptions session_options;
  tensorflow::RunOptions run_options;
  absl::Status s = tensorflow::LoadSavedModel(session_options, run_options,
                                              export_dir, tags, &bundle);
  if (!s.ok()) {
    return Fail(kExitLoad, "loading SavedModel " + export_dir + ": " + s.ToString());
  }
  const auto& signatures = bundle.meta_graph_def.signature_def();

  // 3. Warmup records.
  if (!env->FileExists(warmup_path).ok()) {
    if (allow_missing_warmup) {
      std::fprintf(stderr, "loaded %s; no warmup file at %s\n",
                   export_dir.c_str(), warmup_path.c_str());
      return 0;
    }
    return Fail(kExitWarmup, "no warmup file at " + warmup_path);
  }
  std::unique_ptr<tensorflow::RandomAccessFile> file;
  s = env->NewRandomAccessFile(warmup_path, &file);
  if (!s.ok()) return Fail(kExitWarmup, "opening " + warmup_path + ": " + s.ToString());
  tensorflow::io::RecordReader reader(file.get());
  uint64_t offset = 0;
  int index = 0;
  while (true) {
    tensorflow::tstring record;
    s = reader.ReadRecord(&offset, &record);
    if (absl::IsOutOfRange(s)) break;  // clean end of file
    if (!s.ok()) {
      return Fail(kExitWarmup, "reading record " + std::to_string(index) +
                                   " of " + warmup_path + ": " + s.ToString());
    }
    if (index >= kMaxWarmupRecords) {
      return Fail(kExitWarmup, "more than " + std::to_string(kMaxWarmupRecords) +
                                   " warmup records in " + warmup_path +
                                   " (TF Serving's limit)");
    }
    const std::string where = "warmup record " + std::to_string(index);

    WarmupRequest req;
    std::string err = ParsePredictionLog(std::string(record.data(), record.size()), &req);
    if (!err.empty()) return Fail(kExitWarmup, where + ": " + err);

    const std::string sig_name =
        req.signature_name.empty() ? kDefaultSignature : req.signature_name;
    auto sig_it = signatures.find(sig_name);
    if (sig_it == signatures.end()) {
      std::string known;
      for (const auto& kv : signatures) known += (known.empty() ? "" : ", ") + kv.first;
      return Fail(kExitRun, where + ": signature '" + sig_name +
                                "' not found; the SavedModel has: " + known);
    }
    const tensorflow::SignatureDef& sig = sig_it->second;

    // Inputs: aliases must be exactly the signature's inputs (TF Serving's
    // Predict rejects missing or extra aliases).
    std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
    std::unordered_set<std::string> seen;
    for (const auto& [alias, bytes] : req.inputs) {
      auto in_it = sig.inputs().find(alias);
      if (in_it == sig.inputs().end()) {
        return Fail(kExitRun, where + ": input alias '" + alias +
                                  "' is not in signature '" + sig_name + "'");
      }
      if (in_it->second.name().empty()) {
        return Fail(kExitRun, where + ": input '" + alias +
                                  "' is not a dense tensor (unsupported)");
      }
      tensorflow::TensorProto proto;
      if (!proto.ParseFromString(bytes)) {
        return Fail(kExitWarmup, where + ": input '" + alias + "': bad TensorProto");
      }
      tensorflow::Tensor tensor;
      if (!tensor.FromProto(proto)) {
        return Fail(kExitWarmup, where + ": input '" + alias +
                                     "': TensorProto does not convert to a Tensor");
      }
      if (tensor.dtype() != in_it->second.dtype()) {
        return Fail(kExitRun, where + ": input '" + alias + "' has dtype " +
                                  DtypeName(tensor.dtype()) + ", signature expects " +
                                  DtypeName(in_it->second.dtype()));
      }
      seen.insert(alias);
      feeds.emplace_back(in_it->second.name(), std::move(tensor));
    }
    for (const auto& kv : sig.inputs()) {
      if (!seen.count(kv.first)) {
        return Fail(kExitRun, where + ": input '" + kv.first + "' of signature '" +
                                  sig_name + "' is missing from the request");
      }
    }

    // Outputs: all of the signature's, or the request's output_filter; sorted
    // by alias for stable output.
    std::vector<std::string> aliases;
    if (req.output_filter.empty()) {
      for (const auto& kv : sig.outputs()) aliases.push_back(kv.first);
    } else {
      aliases = req.output_filter;
    }
    std::sort(aliases.begin(), aliases.end());
    std::vector<std::string> fetches;
    for (const std::string& alias : aliases) {
      auto out_it = sig.outputs().find(alias);
      if (out_it == sig.outputs().end() || out_it->second.name().empty()) {
        return Fail(kExitRun, where + ": output '" + alias +
                                  "' is not a dense output of signature '" +
                                  sig_name + "'");
      }
      fetches.push_back(out_it->second.name());
    }

    std::vector<tensorflow::Tensor> outputs;
    s = bundle.session->Run(feeds, fetches, {}, &outputs);
    if (!s.ok()) {
      return Fail(kExitRun, where + " (signature '" + sig_name + "'): " + s.ToString());
    }

    std::string line = "{\"index\":" + std::to_string(index) +
                       ",\"model\":" + JsonString(req.model_name) +
                       ",\"signature\":" + JsonString(sig_name) + ",\"outputs\":{";
    for (size_t i = 0; i < aliases.size(); ++i) {
      if (i) line += ",";
      line += JsonString(aliases[i]) + ":" + JsonTensor(fetches[i], outputs[i], max_values);
    }
    line += "}}\n";
    std::fputs(line.c_str(), stdout);
    std::fflush(stdout);
    ++index;
  }
  if (index == 0 && !allow_missing_warmup) {
    return Fail(kExitWarmup, "no warmup records in " + warmup_path);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
