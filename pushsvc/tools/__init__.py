"""Tooling around the service, which the service never imports: ``pushsvc dev``, the
offline model (``pushsvc fake-llm``), ``pushsvc submit``'s terminal UI, ``pushsvc bench``
and the process plumbing they and the tests share (``procs``).

``tests/test_layout.py`` keeps it apart: no module outside ``tools`` (but ``cli.py``,
lazily, inside the commands) imports it.
"""
