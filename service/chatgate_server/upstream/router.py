"""Which deployment serves each attempt of a call.

:meth:`Router.plan` turns the model a caller named into a :class:`RoutePlan`: the
deployments that may serve it, in the order this call will try them (a route's order,
or a weighted draw), then those of the route's fallback model. The completion service
asks the plan for a :class:`Leg` — a deployment and its breaker permit — per attempt:

- the next attempt goes to the candidate this call has tried least, earliest in the
  order first. With one deployment every retry stays on it; with several, a failed
  attempt moves to the next one at once, and only when each was tried does the call
  come back round (after the retry schedule's backoff);
- a deployment whose breaker refuses, or that is at its stream limit, is passed over;
  when every candidate's breaker refuses, the call gets
  :class:`~chatgate_server.errors.BreakerOpen` with the earliest reopen;
- a call holds one permit per deployment while it stays there (retries on one
  deployment are one call to its breaker, as with a single upstream); on leaving a
  deployment its permit is judged by the failure that made the call leave.

The retry budget (attempts per call, retries and failovers together) and the deadline
are the retry schedule's (``retry.py``); the plan only says where.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from chatgate_server.domain import FEATURES, CompletionRequest, Feature
from chatgate_server.errors import (
    BreakerOpen,
    ChatgateError,
    DeadlineExceeded,
    FieldViolation,
    InvalidRequest,
    TooManyStreams,
    UpstreamError,
    UpstreamMisconfigured,
)
from chatgate_server.upstream.breaker import BreakerState, Permit
from chatgate_server.upstream.classify import model_not_found
from chatgate_server.upstream.deployment import Deployment

# Below this share of its rate limit left, a deployment is tried after the others.
LOW_HEADROOM = 0.05


@dataclass(frozen=True, slots=True)
class Route:
    """A model name (or alias) callers use → the deployments that serve it."""

    name: str
    """What the caller sends as ``model`` (e.g. "fast")."""
    model: str
    """The model asked of the deployments (mapped per deployment to its own name)."""
    deployments: tuple[Deployment, ...]
    weighted: bool = False
    """Draw the order by weight per call; else try them in the order listed."""
    fallback: str | None = None
    """Another model (or route) to try once these deployments have each failed."""


@dataclass(frozen=True, slots=True)
class Candidate:
    deployment: Deployment
    model: str  # the model asked of it (the route's, or its fallback's)
    fallback: str | None = None
    """The route's fallback (as chatgate.toml names it) this candidate serves; None for
    the model the caller asked for. The final event and the row say so."""
    routed: bool = False
    """A route (chatgate.toml) named the model; else it is the caller's own name."""


class Leg:
    """One deployment's part in a call: the permit, held while the call stays there."""

    __slots__ = ("candidate", "error", "permit")

    def __init__(self, candidate: Candidate, permit: Permit) -> None:
        self.candidate = candidate
        self.permit = permit
        self.error: BaseException | None = None

    @property
    def deployment(self) -> Deployment:
        return self.candidate.deployment

    def request(self, request: CompletionRequest) -> CompletionRequest:
        return self.deployment.request_for(request, self.candidate.model)

    def judge(self, error: BaseException) -> BaseException:
        """``error`` as this leg means it. An upstream with no deployment of the name sent
        is the operator's problem when chatgate.toml chose that name, and the caller's
        when it was the caller's own model name passed through by a ``"*"`` entry: then
        it is a model that does not exist, as OpenAI's 404 model_not_found is."""
        if (
            isinstance(error, UpstreamMisconfigured)
            and error.names_deployment
            and not self.candidate.routed
            and self.candidate.model not in self.deployment.models
        ):
            return model_not_found(error.http_status)
        return error


class Router:
    """Routes and deployments; plans each call."""

    def __init__(
        self,
        deployments: Sequence[Deployment],
        routes: Mapping[str, Route] | None = None,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not deployments:
            raise ValueError("a router needs at least one deployment")
        self.deployments = tuple(deployments)
        self.routes = dict(routes or {})
        self._rng = rng

    def plan(self, model: str, needs: frozenset[Feature] = frozenset()) -> RoutePlan:
        """The candidates for a call asking for ``model`` that accept every request option
        in ``needs`` (the request's features); InvalidRequest when none serve the model,
        or none of those that do accept the options (a violation on each option)."""
        candidates = self._candidates(model, seen=set(), fallback=None)
        if not candidates:
            raise InvalidRequest([FieldViolation("model", "no deployment of this service serves this model")])
        if needs:
            able = [c for c in candidates if needs <= c.deployment.accepts]
            if not able:
                raise InvalidRequest(_unaccepted(model, needs, candidates))
            candidates = able
        return RoutePlan(candidates)

    def _candidates(self, model: str, seen: set[str], fallback: str | None) -> list[Candidate]:
        """``fallback``: the fallback name ``model`` is being planned for (None at the top)."""
        seen.add(model)
        route = self.routes.get(model)
        if route is None:
            # Deployments that name the model come before those that only pass any name
            # through ("*"): a pass-through (an Azure resource, a self-hosted server) may
            # not have it under that name, where a deployment that maps it does.
            named = [d for d in self.deployments if model in d.models]
            passing = [d for d in self.deployments if model not in d.models and d.serves(model)]
            ordered = self._steered(named, weighted=True) + self._steered(passing, weighted=True)
            # A fallback's name is chatgate.toml's, not the caller's.
            routed = fallback is not None
            return [Candidate(d, model, fallback, routed) for d in ordered]
        ordered = self._steered(route.deployments, weighted=route.weighted)
        out = [Candidate(d, route.model, fallback, routed=True) for d in ordered]
        if route.fallback is not None and route.fallback not in seen:
            out += self._candidates(route.fallback, seen, route.fallback)
        return out

    def _steered(self, deployments: Sequence[Deployment], *, weighted: bool) -> list[Deployment]:
        """Deployments with rate-limit headroom first (in the route's order, or drawn by
        weight × headroom); those nearly out of it, or cooling down after a 429, last,
        the most headroom first: steering away before a 429 rather than after."""
        if len(deployments) <= 1:
            return list(deployments)
        room = {id(d): d.room for d in deployments}
        ready = [d for d in deployments if room[id(d)] > LOW_HEADROOM]
        low = sorted((d for d in deployments if room[id(d)] <= LOW_HEADROOM), key=lambda d: -room[id(d)])
        if weighted:
            ready = self._weighted(ready, lambda d: d.weight * room[id(d)])
        return ready + low

    def _weighted(
        self, deployments: list[Deployment], weight: Callable[[Deployment], float]
    ) -> list[Deployment]:
        """An order drawn by weight, without replacement: the first place goes to each
        deployment in proportion to its weight."""
        pool = list(deployments)
        order: list[Deployment] = []
        while len(pool) > 1:
            weights = [weight(d) for d in pool]
            point = self._rng() * sum(weights)
            for index, w in enumerate(weights):
                point -= w
                if point < 0 or index == len(pool) - 1:
                    order.append(pool.pop(index))
                    break
        return order + pool


class RoutePlan:
    """One call's candidates and the legs it has run (see the module docstring)."""

    __slots__ = ("_current", "_tries", "candidates")

    def __init__(self, candidates: list[Candidate]) -> None:
        self.candidates = candidates
        self._tries = [0] * len(candidates)
        self._current: tuple[int, Leg] | None = None

    @property
    def breaker_state(self) -> BreakerState:
        """The state of the breaker the call meets first (open only when all are)."""
        states = [c.deployment.breaker.state for c in self.candidates]
        return next((s for s in states if s is not BreakerState.OPEN), BreakerState.OPEN)

    def next(self) -> Leg:
        """The leg for the next attempt, holding a permit of its deployment.

        BreakerOpen when every candidate's breaker refuses; TooManyStreams when the rest
        are at their stream limit."""
        current = self._current
        refused: list[BreakerOpen] = []
        full = False
        for index in self._order():
            if current is not None and current[0] == index:
                return self._again(current[1], index)
            candidate = self.candidates[index]
            deployment = candidate.deployment
            if deployment.full:
                full = True
                continue
            try:
                permit = deployment.breaker.acquire()
            except BreakerOpen as exc:
                refused.append(exc)
                continue
            self._leave()
            leg = Leg(candidate, permit)
            self._current = (index, leg)
            deployment.in_flight += 1
            return self._again(leg, index)
        if full:
            raise TooManyStreams("every deployment serving this model is at its stream limit")
        soonest = min((e.retry_after for e in refused if e.retry_after is not None), default=None)
        raise BreakerOpen(
            "every deployment serving this model is failing; calls are paused", retry_after=soonest
        )

    def _again(self, leg: Leg, index: int) -> Leg:
        self._tries[index] += 1
        leg.error = None
        return leg

    def _order(self) -> list[int]:
        """Least tried first; among equals, the plan's order."""
        return sorted(range(len(self.candidates)), key=lambda i: self._tries[i])

    def would_move(self) -> bool:
        """Whether the next attempt would go to another deployment (a failover, which
        needs no backoff: that deployment has not just failed, and is not cooling down
        after a 429)."""
        current = self._current
        for index in self._order():
            if current is not None and current[0] == index:
                return False
            deployment = self.candidates[index].deployment
            if deployment.full or deployment.breaker.state is BreakerState.OPEN:
                continue
            return not deployment.headroom.cooling
        return False

    def failed(self, error: BaseException) -> None:
        """The latest attempt failed with ``error`` (judged when the call leaves)."""
        if self._current is not None:
            self._current[1].error = error
            if isinstance(error, UpstreamMisconfigured):
                self._current[1].deployment.misconfigured(error)

    def _leave(self) -> None:
        if self._current is None:
            return
        leg = self._current[1]
        self._current = None
        leg.deployment.in_flight -= 1
        error = leg.error
        if isinstance(error, UpstreamError) and error.breaker_failure:
            leg.permit.failure()
        else:
            leg.permit.release()

    # --- the end of the call: the leg that ran last is judged by how the call ended ---

    def succeeded(self) -> None:
        if self._current is not None:
            self._current[1].permit.success()
        self.release()

    def judged(self, failure: bool) -> None:
        """The call failed; ``failure`` says whether that counts against the deployment."""
        if self._current is not None:
            permit = self._current[1].permit
            permit.failure() if failure else permit.release()
        self.release()

    def release(self) -> None:
        """Give back what the call holds (a permit already judged is not judged again)."""
        if self._current is not None:
            self._current[1].error = None
            self._leave()


def _unaccepted(model: str, needs: frozenset[Feature], candidates: list[Candidate]) -> list[FieldViolation]:
    """Why no candidate can take the call: each option none of them accepts, or (when each
    is accepted somewhere) the options no one deployment accepts together."""
    asked = [f for f in FEATURES if f in needs]
    alone = [f for f in asked if not any(f in c.deployment.accepts for c in candidates)]
    if alone:
        return [FieldViolation(f, f"no deployment serving model {model} accepts {f}") for f in alone]
    together = ", ".join(asked)
    return [
        FieldViolation(f, f"no deployment serving model {model} accepts {together} together") for f in asked
    ]


def breaker_failure(exc: ChatgateError, started: bool, first_token: bool) -> bool:
    """Whether a call that failed with ``exc`` counts against its deployment's breaker
    (``breaker.py`` says why a stream that failed after content does not)."""
    if isinstance(exc, UpstreamError) and exc.breaker_failure and not first_token:
        return True
    return isinstance(exc, DeadlineExceeded) and not started
