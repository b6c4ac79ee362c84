"""The torture run: a seeded, randomised run of the whole system under crashes and faults.

``harness.run_torture`` drives daemons (``daemons``, as processes), the simulator and the
database (``database``) at once, with a writer (``writer``), the guide's faults and the seams
of ``seams`` (database outages mid-call, out-of-order lane commits, poison rows, method edits,
key reuse after retention, reloads mid-call, operator cancels) and ``answers`` (a method
refused outside maintenance, a server's "failed to connect" after executing, vgw-db deadline
storms), and checks the promise at the end (``checks``: nothing lost, nothing doubled, nothing
executed then dropped, lanes in order and one row of a lane in flight, one method and one
request per key, responses kept, parked rows exactly those the faults called for, every
recorded answer read as the policy table says, refused methods held). ``test_torture.py``
is the CI-sized run on every database; ``python -m tests.torture --minutes 10 --db postgresql
--seed N`` is the long one.
"""
