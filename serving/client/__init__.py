"""A client for the served two-tower models, speaking TensorFlow Serving's API.

Depends only on the TF Serving protos (``tensorflow-serving-api``), ``grpc``,
numpy and the standard library (REST goes through ``urllib``), never on the
project's trainer/export/server code, so it works unchanged against a real
``tensorflow_model_server`` and against ``python -m serving``.

    with RetrievalClient("localhost:8500") as client:                 # gRPC
        client.recommend({"user_id": "u12", "age": 31, "favorite_genres": "Action|Drama"},
                         k=10, seen_item_ids=["i3", "i9"])
        # -> [Recommendation(item_id="i17", score=0.83), ...]

    RetrievalClient("http://localhost:8501", transport="rest")        # REST

    with TowerClient("localhost:8500", model_name="query_tower") as tower:
        tower.embed([{"user_id": "u12", ...}])                        # -> np.ndarray [n, d]

Three modules, one job each: :mod:`~serving.client.tensors` (feature values
to tensors and JSON, and back), :mod:`~serving.client.transport` (gRPC or
REST, a deadline per attempt, retries of UNAVAILABLE and RESOURCE_EXHAUSTED
with exponential backoff and full jitter) and :mod:`~serving.client.clients`
(the signature, fetched once, checks the features before anything is sent).
A server's error answer raises :class:`ServerError`.
"""
from serving.client.clients import (Recommendation, RetrievalClient, ServingClient,
                                    TowerClient, embed)
from serving.client.errors import ClientError, FeatureError, ServerError
from serving.client.tensors import InputSpec, make_tensor_proto, tensor_to_array

__all__ = ["RetrievalClient", "TowerClient", "ServingClient", "Recommendation", "embed",
           "ClientError", "FeatureError", "ServerError", "InputSpec", "make_tensor_proto",
           "tensor_to_array"]
