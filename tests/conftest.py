import os

import torch

# Two cores on CI: one intra-op thread per test process keeps timings and memory predictable.
torch.set_num_threads(int(os.environ.get("ATTNLAB_TEST_THREADS", "2")))
