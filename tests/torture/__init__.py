"""The torture run: a seeded, randomised run of the whole system under crashes and faults.

``harness.run_torture`` runs it in phases (rage, calm, settle, judge). The modules:

- ``world``: what is under test: the simulated Recrypt (``simulator``), the database
  (``database``) and the ``outbox run`` processes (``daemons``).
- ``writers``: rows of every kind, by plain SQL and by ``outbox.enqueue``.
- ``chaos``: the loop that injects, from one seed, what these modules hold: ``faults`` (the
  guide's table, its windows, kills, connection cuts, simulator and server restarts),
  ``seams`` (database outages mid-call, out-of-order lane commits, poison rows, method edits,
  key reuse after retention, reloads mid-call, operator cancels), ``lanes`` (parked lane heads
  finished by an operator or by hand) and ``answers`` (a method refused outside maintenance, a
  server's "failed to connect" after executing, vgw-db deadline storms).
- ``promises``: one function per promise, checked at the end (``PROMISES``: nothing lost,
  nothing doubled, nothing executed then dropped, lanes in order and one row of a lane in
  flight, one method and one request per key, every response kept, every answer read as the
  policy says, refused methods held, …), reading ``observed`` (what happened) and
  ``endings`` (where each kind of row must end).
- ``vocabulary``: the settings, the row spec and the report every module shares.

``test_torture.py`` is the CI-sized run on every database and shows each promise catching its
own violation; ``python -m tests.torture --minutes 10 --db postgresql --seed N`` is the long one.
"""
