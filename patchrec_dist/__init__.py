"""patchrec_dist: training LLM recommenders on very long user histories (PatchRec), at scale.

``from patchrec_dist import Recommender`` gives recommendations from a trained run
(patchrec_dist/evaluate/recommend.py); the rest is used through the launchers and tools.
"""


def __getattr__(name: str):
    # lazy: `import patchrec_dist` (the launcher, the pipeline CLI) stays free of torch and transformers
    if name == "Recommender":
        from patchrec_dist.evaluate.recommend import Recommender

        return Recommender
    raise AttributeError(f"module 'patchrec_dist' has no attribute {name!r}")


__all__ = ["Recommender"]
