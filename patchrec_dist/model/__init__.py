"""Model-side pieces: patch embeddings (one embedding call per micro-step)."""

from patchrec_dist.model.patch_embed import embed_with_patches, per_item_loop_reference, segment_mean

__all__ = ["embed_with_patches", "per_item_loop_reference", "segment_mean"]
