"""Each exported version loads and serves its warmup requests in C++.

The checker is compiled against the TensorFlow wheel and uses
``tensorflow::LoadSavedModel``, the loader TF Serving's model server uses,
with the ScaNN op library loaded first: no Python runs inside, so a graph that
needs Python would fail here as it would in TF Serving.
"""
import pytest

from export.native_loader import check_saved_model, compiler_available
from export.warmup import read_warmup_requests

pytestmark = pytest.mark.skipif(not compiler_available(),
                                reason="no C++ compiler (g++) to build the loader check")


@pytest.mark.parametrize("model", ["query_tower", "candidate_tower", "retrieval",
                                   "retrieval_exact"])
def test_exported_version_loads_natively(exported, native_checker, model):
    base, _ = exported
    version_dir = base / model / "1"
    results = check_saved_model(version_dir)
    assert len(results) == len(read_warmup_requests(version_dir)) >= 2
    for r in results:
        assert r["outputs"], r
