"""Per-signature data computed once at load time, and request validation.

A :class:`Signature` keeps the tensor names, dtypes and shapes of one
SignatureDef so the hot path never re-reads the proto.  Its checks
(``check_aliases``, ``check_tensor``, ``batch_size``) validate a
request's aliases, dtypes and shapes against it before anything runs, naming
the offending input.
"""
from dataclasses import dataclass

from serving.errors import internal, invalid_argument
from serving.tensors import dtype_name, numpy_dtype

PREDICT_METHODS = (
    "tensorflow/serving/predict",
    "tensorflow/serving/classify",
    "tensorflow/serving/regress",
)


@dataclass(frozen=True)
class TensorSpec:
    alias: str
    name: str          # graph tensor name, e.g. "serving_default_age:0"
    dtype: int         # types_pb2 enum
    shape: tuple       # dims, -1 = unknown; None = unknown rank
    np_dtype: object

    def describe_shape(self) -> str:
        return "[?]" if self.shape is None else "[" + ",".join(map(str, self.shape)) + "]"


def _spec(alias, info) -> TensorSpec:
    shape = None if info.tensor_shape.unknown_rank else tuple(
        d.size for d in info.tensor_shape.dim)
    return TensorSpec(alias, info.name, info.dtype, shape, numpy_dtype(info.dtype))


class Signature:
    """One SignatureDef, indexed for request validation and sess.run."""

    def __init__(self, key: str, signature_def):
        self.key = key
        self.method_name = signature_def.method_name
        self.inputs = {a: _spec(a, i) for a, i in signature_def.inputs.items()}
        self.outputs = {a: _spec(a, i) for a, i in signature_def.outputs.items()}
        self.input_aliases = sorted(self.inputs)
        self.output_aliases = sorted(self.outputs)
        self.has_defaults = len(signature_def.defaults) > 0
        # Batching merges along dim 0 only when every tensor has an unknown dim 0.
        self.batchable = all(
            s.shape is not None and len(s.shape) >= 1 and s.shape[0] == -1
            for s in list(self.inputs.values()) + list(self.outputs.values()))

    def check_method(self):
        """INTERNAL, as TF Serving answers a signature Predict cannot run."""
        if self.method_name and self.method_name not in PREDICT_METHODS:
            raise internal(
                "Expected prediction signature method_name to be one of {"
                + ", ".join(PREDICT_METHODS) + "}. Was: " + self.method_name)

    def check_aliases(self, sent) -> None:
        """Raises INVALID_ARGUMENT unless ``sent`` names exactly the inputs."""
        sent = set(sent)
        expected = set(self.inputs)
        if sent == expected:
            return
        extra = sorted(sent - expected)
        missing = sorted(expected - sent)
        if self.has_defaults and not extra:
            return
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(self.input_aliases)}}}). "
            f"Sent extra: {{{','.join(extra)}}}. "
            f"Missing but required: {{{','.join(missing)}}}.")

    def resolve_outputs(self, output_filter) -> tuple:
        """Output aliases to fetch, in request order (all, sorted, when empty)."""
        if not output_filter:
            return tuple(self.output_aliases)
        seen = []
        for alias in output_filter:
            if alias not in self.outputs:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {alias} Outputs "
                    f"expected to be in the set {{{','.join(self.output_aliases)}}}.")
            if alias in seen:
                raise invalid_argument(f"duplicate output tensor alias: {alias}")
            seen.append(alias)
        return tuple(seen)

    def check_tensor(self, alias: str, dtype: int, shape: tuple) -> None:
        """Checks one input's dtype and shape against the SignatureDef."""
        spec = self.inputs[alias]
        if dtype != spec.dtype:
            raise invalid_argument(
                f"Input \"{alias}\": expected dtype {dtype_name(spec.dtype)} but got "
                f"{dtype_name(dtype)}.")
        if spec.shape is None:
            return
        if len(shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, shape)):
            raise invalid_argument(
                f"Input \"{alias}\": shape [{','.join(map(str, shape))}] is not "
                f"compatible with the signature shape {spec.describe_shape()}.")
        if spec.shape and spec.shape[0] == -1 and shape[0] == 0:
            raise invalid_argument(f"Input \"{alias}\": empty batch (dimension 0 is 0).")

    def batch_size(self, shapes: dict) -> int:
        """The dim 0 that all batched inputs (alias -> (dtype, shape)) agree on (0 if none)."""
        size = None
        for alias, (_, shape) in shapes.items():
            spec = self.inputs[alias]
            if spec.shape and spec.shape[0] == -1:
                if size is None:
                    size = shape[0]
                elif shape[0] != size:
                    raise invalid_argument(
                        f"Input \"{alias}\": batch size {shape[0]} differs from "
                        f"the other inputs' batch size {size}.")
        return size or 0
