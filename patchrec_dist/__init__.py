"""patchrec_dist: training LLM recommenders on very long user histories (PatchRec), at scale.

``from patchrec_dist import Recommender`` gives recommendations from a trained run
(patchrec_dist/evaluate/recommend.py); the rest is used through the launchers and tools.
"""

import os

# transformers >= 5.2x loads a model with kernels fetched from the Hugging Face Hub (use_kernels=None
# means on) whenever the `kernels` package is installed, which transformers now requires. On a GPU that
# means a download at model load and a refusal for unverified publishers: a compute node without the
# Hub, or any node, stops with "Kernel repository 'kernels-community/rotary' could not verify publisher
# trust status" (seen on an H200, bench/gpu_check.sh). Off unless the user turns it on explicitly
# (USE_HUB_KERNELS=YES); read by transformers at every load, so it holds in every launched rank.
os.environ.setdefault("USE_HUB_KERNELS", "NO")


def __getattr__(name: str):
    # lazy: `import patchrec_dist` (the launcher, the pipeline CLI) stays free of torch and transformers
    if name == "Recommender":
        from patchrec_dist.evaluate.recommend import Recommender

        return Recommender
    raise AttributeError(f"module 'patchrec_dist' has no attribute {name!r}")


__all__ = ["Recommender"]
