import os

import torch

# Two cores on CI: one intra-op thread per test process keeps timings and memory predictable.
torch.set_num_threads(int(os.environ.get("ATTNLAB_TEST_THREADS", "2")))

from hypothesis import settings  # noqa: E402

# Deterministic fuzzing: the same examples on every run and machine (a CI failure reproduces locally);
# no per-example deadline, since a shared 2-core machine stalls unpredictably.
settings.register_profile("attnlab", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "attnlab"))
