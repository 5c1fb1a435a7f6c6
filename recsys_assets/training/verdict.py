"""The training run's promotion verdict: what ``model_evaluation`` decides and what
``registered_model`` does with it.

The figures come from the evaluation step; the rules live in the registry
(:func:`~recsys_serving.registry.decide_promotion`,
:func:`~recsys_serving.registry.decide_first_model`). This module combines them into one
verdict: ``first_model`` / ``below_popularity`` while production has no model that beat
popularity, ``promote`` / ``reject`` otherwise. Registration only makes a model
production in the first case; later promotions belong to the closed loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recsys_serving.logging import get_logger
from recsys_serving.registry import (
    ANSWERS,
    POPULARITY_ANSWERS,
    PRODUCTION,
    FirstModelDecision,
    PromotionDecision,
    PromotionRule,
    decide_first_model,
    decide_promotion,
)

log = get_logger(__name__)

FIRST_MODEL = "first_model"
BELOW_POPULARITY = "below_popularity"
PROMOTE = "promote"
REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Verdict:
    """``decision`` and why; the two rules' own decisions are kept as evidence."""

    decision: str
    reason: str
    promotion: PromotionDecision
    first_model: FirstModelDecision
    first_model_applies: bool


def judge(
    *,
    rule: PromotionRule,
    comparisons: Mapping[str, Mapping[str, Any] | None],
    challenger_metrics: Mapping[str, Any],
    production_metrics: Mapping[str, Any] | None,
    production_version: str | None,
    production_gated: bool,
    production_unusable: str | None,
    impressions: int,
) -> Verdict:
    """The verdict on a challenger.

    While production has no model that beat popularity (none yet, or one kept answering
    with popularity: ``production_gated``), the first-model rule decides. A production
    that cannot be loaded (``production_unusable``) is no bar to clear: the promotion
    rule judges the challenger on its own figures."""
    first_model = decide_first_model(comparisons, rule, impressions=impressions)
    decision = decide_promotion(dict(challenger_metrics), production_metrics, rule)
    reason = decision.reason
    applies = production_version is None or production_gated
    if applies:
        verdict = FIRST_MODEL if first_model.serve else BELOW_POPULARITY
        reason = (
            ""
            if production_version is None
            else f"production {production_version} answers with popularity; "
        ) + (first_model.warning or first_model.reason)
    elif production_unusable is not None:
        verdict = PROMOTE if decision.promote else REJECT
        unusable = f"production {production_version} cannot be evaluated ({production_unusable}); "
        reason = unusable + (
            f"the challenger replaces it on its own {rule.metric}="
            f"{challenger_metrics.get(rule.metric)}"
            if decision.promote
            else reason
        )
    else:
        verdict = PROMOTE if decision.promote else REJECT
    if first_model.warning is not None and verdict in (FIRST_MODEL, BELOW_POPULARITY):
        log.warning("evaluation.first_model_rule", decision=verdict, warning=first_model.warning)
    return Verdict(verdict, reason, decision, first_model, applies)


def registration_tags(evaluation: Mapping[str, Any]) -> dict[str, str]:
    """The evaluation's headline figures as registration tags (``recsys models show``)."""
    k = evaluation.get("k", 10)
    name = f"ndcg@{k}"
    tags: dict[str, str] = {}
    metrics = evaluation.get("metrics") or {}
    per_user = (evaluation.get("per_user") or {}).get("metrics") or {}
    for prefix, source in (("holdout", metrics), ("per_user", per_user)):
        for model in ("challenger", "popularity"):
            value = (source.get(model) or {}).get(name)
            if isinstance(value, int | float):
                tags[f"{prefix}_{model}_{name}"] = f"{value:.4f}"
    return tags


@dataclass(frozen=True, slots=True)
class FirstPromotion:
    """How a registered model becomes production when no model beat popularity yet."""

    reason: str
    evidence: dict[str, Any]
    registered_as: str
    below_popularity: bool


def first_promotion(evaluation: Mapping[str, Any]) -> FirstPromotion:
    """Production's alias move for the first model (or one replacing a popularity-only
    production): its own answers, or popularity's when it is below popularity."""
    rule = evaluation.get("first_model_rule") or {}
    evidence: dict[str, Any] = {
        "metrics": evaluation["metrics"]["challenger"],
        "first_model_rule": {k: rule.get(k) for k in ("serve", "reason", "warning")}
        | {"judged": (rule.get("evidence") or {}).get("judged")},
    }
    if evaluation["decision"] == BELOW_POPULARITY:
        evidence[ANSWERS] = POPULARITY_ANSWERS
        return FirstPromotion(
            reason=f"first model, answering with popularity: {evaluation['decision_reason']}",
            evidence=evidence,
            registered_as=f"{PRODUCTION} (answers: {POPULARITY_ANSWERS})",
            below_popularity=True,
        )
    return FirstPromotion(
        reason=f"first model: {evaluation['decision_reason']}",
        evidence=evidence,
        registered_as=PRODUCTION,
        below_popularity=False,
    )
