import os

import pytest

from tests.slurm.local_slurm import LocalSlurm, unavailable_reason


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), n_nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
