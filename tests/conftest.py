import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import time

import pytest


@pytest.fixture(scope="session")
def pretrained_toy_world(tmp_path_factory):
    """The real toy world, pretrained once per session into a private GENFT_HOME that the slow tests share.

    Yields {"path", "seconds"}; `genft`'s default cache resolves to it while the session lasts.
    """
    from genft.toyworld import PretrainConfig, default_cache_dir, pretrain

    patch = pytest.MonkeyPatch()
    patch.setenv("GENFT_HOME", str(tmp_path_factory.mktemp("genft_home")))
    t0 = time.perf_counter()
    path = pretrain(default_cache_dir(), PretrainConfig(), progress=False)
    yield {"path": path, "seconds": time.perf_counter() - t0}
    patch.undo()
