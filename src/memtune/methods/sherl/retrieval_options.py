"""The options of SHERL's retrieval form (`form="retrieval"`, retrieval.py): a mixin of SHERLConfig, as the
trunk-cache options are, so that config.py gains one field (`form`) and these keep their own file and check."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..base import check

RETRIEVAL_LOSSES = ("hinge", "infonce")


@dataclass
class RetrievalOptions:
    """Two-tower retrieval (form="retrieval", retrieval.py); the fused form refuses values other than these defaults.

    embed_size           the joint width E of text_fc and image_fc (VSE∞: 1024)
    loss                 "hinge" (VSE∞'s bidirectional hinge, default) or "infonce" (CLIP4Clip's symmetric InfoNCE)
    margin               the hinge's margin m (VSE∞: 0.2)
    hardest_negative     true: the hinge takes each query's hardest in-batch negative (VSE∞ after its first epoch),
                         false: the sum over all negatives (VSE∞'s first epoch). Towers whose embeddings start
                         near-equal (tiny random models) need false first: the hardest-negative loss sits at
                         2·margin there
    infonce_temperature  InfoNCE's τ in softmax(S/τ) (CLIP's start, 0.07; clamped to >= 0.01)
    learn_temperature    train τ (as CLIP) instead of keeping it fixed (as CLIP4Clip)

    Pairs of the same class (batch["labels"]) are never negatives of each other (retrieval.py says why)."""
    embed_size: int = 1024
    loss: str = "hinge"
    margin: float = 0.2
    hardest_negative: bool = True
    infonce_temperature: float = 0.07
    learn_temperature: bool = False

    def validate_retrieval(self, retrieval: bool) -> None:
        n = self.name
        check(self.embed_size >= 1, f"{n}.embed_size must be a positive joint width, got {self.embed_size}")
        check(self.loss in RETRIEVAL_LOSSES,
              f"{n}.loss must be one of {', '.join(RETRIEVAL_LOSSES)}, got {self.loss!r}")
        check(self.margin >= 0, f"{n}.margin must be >= 0, got {self.margin}")
        check(self.infonce_temperature > 0, f"{n}.infonce_temperature must be > 0, got {self.infonce_temperature}")
        if not retrieval:
            changed = [f.name for f in fields(RetrievalOptions) if getattr(self, f.name) != f.default]
            check(not changed, f"{n}: {', '.join(changed)} apply to form=retrieval only (this config has "
                               f"form={getattr(self, 'form', None)!r})")

