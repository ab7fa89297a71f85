"""The names and defaults of attribution: metrics, the two scores and which one ranks by default,
and the significance settings. No torch here: the API reads these to validate requests, and its
processes start without loading the engine (``models.attribute`` computes; it re-exports these)."""

from __future__ import annotations

METRICS = ("l2", "lpips")
SCORES = ("influence", "resemblance")
DEFAULT_SCORE = "resemblance"
"""What ranks item sources when a request does not say: resemblance, which the copies validation
found specific to the work where influence is not (README "Trust")."""
SET_SOURCE_SCORE = "influence"
"""What ranks class and owner sources by default (a set's nearest image is a poor stand-in for
"the source's content": the class control measured resemblance below influence there), and any
source under metric lpips (resemblance is pixel L2)."""


def default_score(granularity: str, metric: str = "l2") -> str:
    """The default ranking score for sources of this granularity (item, class, owner) and metric:
    resemblance is measured in pixel L2, so metric lpips ranks by influence."""
    return DEFAULT_SCORE if granularity == "item" and metric == "l2" else SET_SOURCE_SCORE


DECOYS = 10_000
"""Decoy codes per attribution (fewer when fewer weight-k codes are free)."""
ALPHA = 0.05
"""Family-wise error level of "attributable" (Bonferroni over the candidates tested)."""
CANDIDATES = 5
"""How many works the selective test asks about: the sources of the images nearest the generation
(chosen by content, blind to the codes), each tested against the decoys, Bonferroni over them."""
P_SCREEN = 100
"""Candidates of the synthetic ranking that get decoy p-values (at least top_k and verify_top_k)."""
