"""Recent feedback counts more: a pair's weight halves every `half_life` rounds of age, so a
change in what users prefer outweighs the older, opposite pairs within a few rounds while those
still steady the reward model meanwhile (exponential forgetting, as in discounted or
sliding-window methods for drifting preferences). A pair's age is the number of trained rounds
that had already read it (its event at or below their watermark): rounds, not hours, so the same
half-life fits a simulation that runs a round a minute and a deployment that runs one a day."""
import bisect

from schemas.records import TrainingPair


def age_in_rounds(event_id: int, watermarks: list[int]) -> int:
    """How many of the trained rounds' `watermarks` (sorted) are at or above `event_id`."""
    return len(watermarks) - bisect.bisect_left(watermarks, event_id)


def weigh_by_recency(pairs: list[TrainingPair], watermarks: list[int], half_life: float | None
                     ) -> list[TrainingPair]:
    """The pairs with `weight` 0.5 ** (age / half_life); None (or 0): every pair weighs 1."""
    if not half_life:
        return pairs
    return [p.model_copy(update={"weight": 0.5 ** (age_in_rounds(p.origin["event_id"], watermarks) / half_life)})
            for p in pairs]
