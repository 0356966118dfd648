"""``pushsvc bench``: load scenarios against a private stack or a running one.

``command`` parses the options and runs one scenario: ``load`` (fanout, push-vs-poll,
throughput, scaleout; its clients in ``clients``, its stack in ``stack``), ``chaos``
(faults in ``faults``, watchers in ``watchers``, the contract's rules in ``invariants``
and the verdict in ``check``, on a Sentinel-managed Redis from ``sentinel`` and
``proxy``) or ``neighbours`` (with the job types of ``jobtypes``).
"""
