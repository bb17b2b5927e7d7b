"""An OpenFeature provider over a :class:`~safeswap.flags.FlagClient`.

Flag key = ``rollout_id``; the evaluation context's ``targeting_key`` = the
user id. A string evaluation resolves to ``"control"`` or ``"candidate"``::

    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext
    from safeswap.openfeature import SafeswapProvider

    api.set_provider_and_wait(SafeswapProvider(broker="kafka1:9092"))  # owns and starts a FlagClient
    details = api.get_client().get_string_details("support-bot-sonnet", "control",
                                                  EvaluationContext(targeting_key=user_id))
    details.value                       # "control" | "candidate"
    details.flag_metadata["model"]      # the served variant's model, prompt_version, ...

Reasons:

- ``SPLIT``: the rollout serves a share strictly between 0% and 100%, the user's
  bucket decided (the normal canary and ramp case).
- ``STATIC``: everyone gets the same variant (0% or 100%, rollback, complete).
- ``DEFAULT``: unknown rollout, or no state yet (broker unreachable at start,
  still reading): ``control``.
- ``STALE``: the client's state is older than ``max_staleness_s``; the value
  follows its ``stale_policy`` (the held split, or control).
- ``ERROR``: no ``targeting_key`` (``TARGETING_KEY_MISSING``): ``control``.
  (OpenFeature then returns the caller's default value: pass ``"control"``.)

``flag_metadata``: the served variant's descriptor from the decision
(``model``, ``prompt_version``, ... as the controller published them in
``Decision.control`` / ``Decision.candidate``), and ``rollout_id``, ``stage``,
``action``, ``percent``, ``shadow_percent``, ``seq``, ``salt``.

A boolean evaluation of the same key is ``variant == "candidate"``; an object
evaluation returns the served variant's descriptor plus ``{"variant": ...}``.
Integer and float evaluations are a ``TYPE_MISMATCH``. Every new decision is
announced as ``PROVIDER_CONFIGURATION_CHANGED`` with ``flags_changed=[rollout_id]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata

from safeswap.flags import FlagClient, rolled_back
from schemas import Decision
from streams.settings import Settings

log = logging.getLogger(__name__)

PROVIDER_NAME = "safeswap"


class SafeswapProvider(AbstractProvider):
    """OpenFeature provider: ``SafeswapProvider(flags)`` for a client you run, or
    ``SafeswapProvider(broker=..., settings=..., **FlagClient kwargs)`` to have the
    provider own one (started on ``initialize``, stopped on ``shutdown``, on a
    background thread, so it works from sync and async apps alike)."""

    def __init__(
        self,
        flags: FlagClient | None = None,
        *,
        broker: str | None = None,
        settings: Settings | None = None,
        catch_up_timeout_s: float = 10.0,
        **client_kwargs: Any,
    ):
        super().__init__()
        self._owns_client = flags is None
        self.flags = flags if flags is not None else FlagClient(broker, settings=settings, **client_kwargs)
        self.catch_up_timeout_s = catch_up_timeout_s
        self._remove_listener = None

    # -- lifecycle ---------------------------------------------------------------
    def initialize(self, evaluation_context: EvaluationContext) -> None:
        if self._owns_client:
            self.flags.start_background(self.catch_up_timeout_s)  # never raises on an unreachable broker
        if self._remove_listener is None:
            self._remove_listener = self.flags.on_change(self._changed)

    def shutdown(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._owns_client:
            self.flags.stop_background()

    def _changed(self, decision: Decision) -> None:
        self.emit_provider_configuration_changed(
            ProviderEventDetails(flags_changed=[decision.rollout_id], message=f"{decision.action} ({decision.stage})")
        )

    def get_metadata(self) -> Metadata:
        return Metadata(name=PROVIDER_NAME)

    # -- resolution ----------------------------------------------------------------
    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, evaluation_context)

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        details = self._resolve(flag_key, evaluation_context)
        return FlagResolutionDetails(
            value=details.value == "candidate",
            error_code=details.error_code,
            error_message=details.error_message,
            reason=details.reason,
            variant=details.variant,
            flag_metadata=details.flag_metadata,
        )

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        details = self._resolve(flag_key, evaluation_context)
        decision = self.flags.decision(flag_key)
        described = dict(getattr(decision, details.value, None) or {}) if decision is not None else {}
        return FlagResolutionDetails(
            value={**described, "variant": details.value},
            error_code=details.error_code,
            error_message=details.error_message,
            reason=details.reason,
            variant=details.variant,
            flag_metadata=details.flag_metadata,
        )

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return _type_mismatch(default_value, "integer")

    def resolve_float_details(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        return _type_mismatch(default_value, "float")

    def _resolve(self, rollout_id: str, context: EvaluationContext | None) -> FlagResolutionDetails[str]:
        user_id = context.targeting_key if context is not None else None
        if not user_id:
            return FlagResolutionDetails(
                value="control",
                variant="control",
                reason=Reason.ERROR,
                error_code=ErrorCode.TARGETING_KEY_MISSING,
                error_message="safeswap needs the user id as the evaluation context's targeting_key",
            )
        flags = self.flags
        decision = flags.decision(rollout_id)
        if decision is None or not flags.serving:
            return FlagResolutionDetails(
                value="control", variant="control", reason=Reason.DEFAULT, flag_metadata={"rollout_id": rollout_id}
            )
        value = flags.variant(rollout_id, user_id)
        if flags.is_stale():
            reason = Reason.STALE
        elif 0 < decision.percent < 100 and not rolled_back(decision):
            reason = Reason.SPLIT
        else:
            reason = Reason.STATIC
        return FlagResolutionDetails(
            value=value, variant=value, reason=reason, flag_metadata=_metadata(decision, value)
        )


def _metadata(decision: Decision, variant: str) -> dict[str, bool | int | float | str]:
    described = decision.candidate if variant == "candidate" else decision.control
    metadata: dict[str, bool | int | float | str] = {k: v for k, v in described.items() if isinstance(v, str)}
    metadata.update(
        rollout_id=decision.rollout_id,
        stage=decision.stage,
        action=decision.action,
        percent=float(decision.percent),
        shadow_percent=float(decision.shadow_percent),
        seq=decision.seq,
        salt=decision.salt,
    )
    return metadata


def _type_mismatch(default_value: Any, kind: str) -> FlagResolutionDetails[Any]:
    return FlagResolutionDetails(
        value=default_value,
        reason=Reason.ERROR,
        error_code=ErrorCode.TYPE_MISMATCH,
        error_message=f"safeswap flags are strings (control|candidate) or booleans, not {kind}",
    )
