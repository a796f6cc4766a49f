"""The local process launcher used by tests and `dchag check-parity`."""

import dist_workers as W
import pytest

from dchag.parallel.launch import spawn


def test_the_failing_rank_is_reported_first_not_its_disconnected_peers():
    with pytest.raises(RuntimeError) as info:
        spawn(W.fail_on_rank_one, 2)
    first = str(info.value).splitlines()[1]
    assert first == "rank 1: ValueError: boom on rank 1"
