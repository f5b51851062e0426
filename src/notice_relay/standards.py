"""The use vocabulary, and how one refusal is written in the vocabularies that AI
developers' pipelines already read.

=============  ===========  =============================  ==========================  ======
use token      AIPREF       CAWG entry (``notAllowed``)    IPTC value (``DMI-…``)      TDMRep
=============  ===========  =============================  ==========================  ======
train-ai       train-ai=n   cawg.ai_training               PROHIBITED-AIMLTRAINING     1
train-genai    train-ai=n   cawg.ai_generative_training    PROHIBITED-GENAIMLTRAINING  1
data-mining    —            cawg.data_mining               PROHIBITED                  1
ai-inference   —            cawg.ai_inference              —                           —
prompt-name    —            cawg.ai_inference (nearest)    —                           —
=============  ===========  =============================  ==========================  ======

Decisions, and why:

- ``train-ai`` implies ``train-genai`` (generative training is AI training; the most
  restrictive reading wins, as AIPREF's combining rule says).
- AIPREF has no separate generative-training label: the working group's vocabulary
  (draft-ietf-aipref-vocab) labels "AI Training" ``train-ai`` and defines it as
  modifying the parameters of a *generative* AI model. A refusal of ``train-genai``
  alone is therefore exactly ``train-ai=n``, and so is ``train-ai``.
- AIPREF's ``ai-use`` category is not used for ``ai-inference``: DESIGN.md leaves that
  cell empty, and the category is still without consensus (its scope over assets a
  user supplies directly is an open issue). CAWG carries the refusal instead.
- IPTC values are the full PLUS vocabulary URIs (``http://ns.useplus.org/ldf/vocab/…``),
  the form the IPTC Photo Metadata Standard 2023.1 writes into ``plus:DataMining``.
  That property holds one value; the list is ordered most restrictive first, so the
  first entry is the one to embed where only one fits.
- TDMRep ``tdm-reservation`` is 1 when any training or mining is refused, and absent
  otherwise: writing 0 would *grant* TDM rights the artist never granted.
- A withdrawal renders nothing (see :func:`notice_relay.normalize.normalize`): it
  carries no refusal, and a pipeline reading only ``standards`` must not see one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from notice_relay.models import Standards, Use

#: What each use token also refuses.
IMPLIES: Mapping[Use, frozenset[Use]] = {
    Use.TRAIN_AI: frozenset({Use.TRAIN_GENAI}),
}

CAWG_NOT_ALLOWED: Final = "notAllowed"
_CAWG: Mapping[Use, str] = {
    Use.TRAIN_AI: "cawg.ai_training",
    Use.TRAIN_GENAI: "cawg.ai_generative_training",
    Use.DATA_MINING: "cawg.data_mining",
    Use.AI_INFERENCE: "cawg.ai_inference",
    # No standard names a refusal to be used as a prompt; inference is the nearest.
    Use.PROMPT_NAME: "cawg.ai_inference",
}

IPTC_VOCAB = "http://ns.useplus.org/ldf/vocab/"
# Most restrictive first: plus:DataMining holds a single value (see the module docstring).
_IPTC: tuple[tuple[Use, str], ...] = (
    (Use.DATA_MINING, IPTC_VOCAB + "DMI-PROHIBITED"),
    (Use.TRAIN_AI, IPTC_VOCAB + "DMI-PROHIBITED-AIMLTRAINING"),
    (Use.TRAIN_GENAI, IPTC_VOCAB + "DMI-PROHIBITED-GENAIMLTRAINING"),
)

_AIPREF_TRAINING = frozenset({Use.TRAIN_AI, Use.TRAIN_GENAI})
_TDM_RESERVED = frozenset({Use.TRAIN_AI, Use.TRAIN_GENAI, Use.DATA_MINING})


def expand_uses(uses: Iterable[Use | str]) -> list[Use]:
    """Return ``uses`` with every implication added (``train-ai`` → ``train-genai``),
    duplicates removed, sorted by token. Raises ValueError for an unknown token."""
    result = {Use(use) for use in uses}
    pending = list(result)
    while pending:
        for implied in IMPLIES.get(pending.pop(), frozenset()):
            if implied not in result:
                result.add(implied)
                pending.append(implied)
    return sorted(result, key=lambda use: use.value)


def render_standards(uses: Iterable[Use | str]) -> Standards:
    """Render a refusal of ``uses`` for AIPREF, CAWG, IPTC and TDMRep (the table in
    the module docstring). Implications are expanded first."""
    refused = frozenset(expand_uses(uses))
    return Standards(
        aipref="train-ai=n" if refused & _AIPREF_TRAINING else None,
        cawg=dict.fromkeys(sorted({_CAWG[use] for use in refused}), CAWG_NOT_ALLOWED),
        iptc=[value for use, value in _IPTC if use in refused],
        tdmrep=1 if refused & _TDM_RESERVED else None,
    )
