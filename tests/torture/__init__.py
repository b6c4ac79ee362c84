"""The torture run: a seeded, randomised run of the whole system under crashes and faults.

``harness.run_torture`` drives daemons (as processes), the simulator and the database at once
and checks the promise at the end (nothing lost, nothing doubled, lanes in order, parked rows
exactly those the faults called for). ``test_torture.py`` is the CI-sized run on every
database; ``python -m tests.torture --minutes 10 --db postgresql --seed N`` is the long one.
"""
