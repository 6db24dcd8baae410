"""Holdings: what each workload holds, and when an observation gives GPUs back."""

from __future__ import annotations

from gpumesh.operator.world import ClusterKey, Holdings

TRAIN = ClusterKey("team-a", "train")
OTHER = ClusterKey("team-a", "other")


def test_a_raycluster_going_away_gives_its_gpus_back() -> None:
    holdings = Holdings()
    assert holdings.observe(TRAIN, {"n1": 2}) is False
    assert holdings.reserved() == {"n1": 2}
    assert holdings.observe(TRAIN, None) is True
    assert holdings.reserved() == {}


def test_shrinking_on_one_node_gives_back_even_when_growing_on_another() -> None:
    holdings = Holdings()
    holdings.observe(TRAIN, {"n1": 2})
    assert holdings.observe(TRAIN, {"n1": 1, "n2": 4}) is True
    assert holdings.observe(TRAIN, {"n1": 1, "n2": 4}) is False
    assert holdings.reserved(exclude=[OTHER]) == {"n1": 1, "n2": 4}


def test_a_terminating_raycluster_of_a_forgotten_workload_frees_gpus_only_when_it_goes() -> None:
    """The workload is forgotten at once; its RayCluster's last events come after."""
    holdings = Holdings()
    holdings.observe(TRAIN, {"n1": 1})
    holdings.forget(TRAIN)
    assert holdings.observe(TRAIN, {"n1": 1}) is False  # still terminating: booked again
    assert holdings.reserved() == {"n1": 1}
    assert holdings.observe(TRAIN, None) is True
    assert holdings.reserved() == {}


def test_what_this_process_promised_hides_the_index_so_nothing_is_given_back() -> None:
    holdings = Holdings()
    holdings.promise(TRAIN, {"n1": 2})
    assert holdings.observe(TRAIN, {"n1": 1}) is False
    assert holdings.reserved() == {"n1": 2}
