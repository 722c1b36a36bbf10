import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import time

import pytest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A barely trained toy world (2 contrastive steps, 1 UNet step): for derived bases whose plumbing needs its parts."""
    from genft.toyworld.pretrain import PretrainConfig, pretrain

    path = tmp_path_factory.mktemp("home") / "toyworld-v2"
    return pretrain(path, PretrainConfig(contrastive_steps=2, contrastive_batch_size=8, unet_steps=1, eval_images_per_prompt=0),
                    progress=False)


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
