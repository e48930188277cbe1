"""The restart policy: exponential backoff up to a cap, forgiven after a stable run."""

from spendledger.supervisor import RestartPolicy


def test_backoff_doubles_up_to_the_cap_and_a_stable_run_resets_it():
    policy = RestartPolicy(base_s=1, max_s=8, stable_after_s=60)
    now = 0.0
    policy.started("worker", now)
    delays = []
    for _ in range(6):  # dies at once, again and again
        now += 0.5
        delay = policy.exited("worker", now)
        delays.append(delay)
        assert not policy.due("worker", now) and policy.due("worker", now + delay)
        now += delay
        policy.started("worker", now)
    assert delays == [1, 2, 4, 8, 8, 8]
    now += 61  # a stable run
    assert policy.exited("worker", now) == 1
    assert policy.total_restarts("worker") == 7


def test_an_exit_seen_twice_before_its_restart_is_counted_once():
    policy = RestartPolicy()
    policy.started("api", 0)
    assert policy.exited("api", 5) == 1
    assert round(policy.exited("api", 5.4), 3) == 0.6  # the restart already pending
    assert policy.total_restarts("api") == 1
